"""GPU check part `packed_scale`: one packed training pass at TreePO's paper shape, per mask form.

The tree is `tiny.paper_shape_samples(512, ...)`: 16 leaves, 14 segments of 512 tokens per path, a
256-token prompt: 97,536 unique tokens in one packed row, 16 flat rows of 7,424. The model has
SmolLM2-135M's width with 2 layers, random weights, bfloat16. Each form (FlexAttention block mask
through transformers' `flex_attention`, treepo's block-sparse kernel, the dense N x N mask, flat rows)
runs one forward + PPO loss + backward; the report gives seconds, peak memory, or the error (an
out-of-memory is a result, not a failure of the part). FlexAttention compiles on first use: its
first pass (compile included) and a second pass are both timed.
"""

from __future__ import annotations

import time

import torch

from ..tiny import paper_shape_samples, paper_shape_tokens
from ..train.logprobs import collate, response_logprobs
from ..train.loss import ppo_loss
from ..train.packing import pack_samples, packed_logprobs

SEG = 512  # the paper's segment length
FORMS = ("flex", "blocks", "dense", "flat")


def scale_model(device="cpu", dtype=torch.float32):
    """SmolLM2-135M's width (hidden 576, 9 query / 3 kv heads, MLP 1536, vocabulary 49,152), 2 layers, random
    weights, train mode (also benchmarks/packed_scale.py's model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=16384, tie_word_embeddings=True,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).train()


def _pass(model, samples, form: str) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    torch.cuda.synchronize() if device.type == "cuda" else None
    start = time.perf_counter()
    if form == "flat":
        batch = collate(samples, 0).to(device)
        logp, _ = response_logprobs(model, batch)
    else:
        packed = pack_samples(samples, 0, dtype=next(model.parameters()).dtype, attention=form).to(device)
        batch = packed.flat
        logp, _ = packed_logprobs(model, packed)
    ppo_loss(logp, batch.old_logprobs, batch.advantages, batch.response_mask,
             float(batch.response_mask.sum())).loss.backward()
    torch.cuda.synchronize() if device.type == "cuda" else None
    return time.perf_counter() - start, logp.detach().float()[batch.response_mask].cpu()


def packed_scale(device: torch.device, report: dict, seg: int = SEG, dtype=torch.bfloat16) -> None:
    model = scale_model(device, dtype)
    samples = paper_shape_samples(seg, model.config.vocab_size)
    report.update(seg=seg, unique_tokens=paper_shape_tokens(seg),
                  flat_tokens=sum(len(s.prompt_ids) + len(s.response_ids) for s in samples), forms={})
    logps = {}
    forms = FORMS if device.type == "cuda" else FORMS[1:]  # FlexAttention trains on CUDA only
    for form in forms:
        mine = report["forms"][form] = {}
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            mine["seconds"], logps[form] = _pass(model, samples, form)
            if form == "flex":  # the first pass compiled the kernels
                mine["seconds_with_compile"] = mine["seconds"]
                mine["seconds"], logps[form] = _pass(model, samples, form)
            if device.type == "cuda":
                mine["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        except (RuntimeError, MemoryError) as e:  # torch.cuda.OutOfMemoryError is a RuntimeError
            mine["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        finally:
            model.zero_grad(set_to_none=True)
    ref = logps.get("flat", logps.get("dense"))
    report["max_logprob_diff_vs_flat_or_dense"] = {f: float((lp - ref).abs().max()) for f, lp in logps.items()
                                                   if ref is not None and lp is not ref}
