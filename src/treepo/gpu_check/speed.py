"""Speed on randomly initialised models of real shapes (see `models`), EOS ignored so every path runs its budget.

One `SpeedBench` per model shape; its three parts share the model, the prompts and the w=16 trees:

- `rollout`: tree vs independent sampling of the same prompts, width 16, depth 4, branching 2:
  wall seconds, decoded tokens, the measured saving, the speedup (independent / tree);
- `decode`: the embedded engine vs HF `generate`, new tokens/s at batch 16 and 64 (prefill included);
- `training_pass`: packed vs flat forward + PPO-loss backward on the w=16 trees, seconds per tree.

Each figure comes with the peak GPU memory of its run (`torch.cuda.max_memory_allocated`, in MiB,
in all and above what was held before it); on the CPU memory is not measured (None). Random
weights give near-uniform logits, so sampled tokens are noise; the figures are about cost only.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from ..config import EngineConfig, SamplerConfig
from ..engines.base import SegmentRequest
from ..engines.transformers_engine import TransformersEngine
from ..rollout.accounting import compare_modes, summarize
from ..rollout.sampler import TreeSampler
from ..tiny import tree_samples
from ..train.logprobs import Sample, collate, response_logprobs
from ..train.loss import ppo_loss
from ..train.packing import pack_samples, packed_logprobs
from .models import ModelSpec, id_tokenizer, random_model, random_prompts


@dataclass(frozen=True)
class SpeedSizes:
    """How much work each speed part does (the GPU defaults; `TOY` for the CPU dry run)."""

    prompts: int = 8  # rollout prompts
    prompt_len: int = 64  # random token ids per prompt
    width: int = 16
    depth: int = 4
    branching: int = 2
    segment_len: int = 64
    decode_batches: tuple[int, ...] = (16, 64)
    decode_tokens: int = 128
    train_trees: int = 4  # w=16 trees timed packed vs flat
    repeats: int = 2  # interleaved repeats of each training pass


TOY = SpeedSizes(prompts=2, prompt_len=8, segment_len=6, decode_tokens=9, train_trees=2, repeats=1)


class PeakMemory:
    """`with PeakMemory(device) as mem:` -> mem.figures(): peak allocated MiB during the block, in all
    and above what was allocated when it began; both None off CUDA."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.start = self.peak = None

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()

    def figures(self) -> dict:
        if self.peak is None:
            return {"peak_memory_mib": None, "peak_above_start_mib": None}
        return {"peak_memory_mib": round(self.peak / 2**20, 1),
                "peak_above_start_mib": round((self.peak - self.start) / 2**20, 1)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class SpeedBench:
    """The speed parts of one model shape on one device; the model is built on first use."""

    def __init__(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype, sizes: SpeedSizes,
                 toy: bool = False, seed: int = 0):
        self.spec, self.device, self.dtype, self.sizes, self.toy, self.seed = spec, device, dtype, sizes, toy, seed
        self._model = self._error = None
        self.info: dict = {}
        self.trees = None  # the w=16 tree rollout, for the training pass

    # -- the model --------------------------------------------------------------------------
    @property
    def model(self):
        if self._error is not None:
            raise RuntimeError(f"building the {self.spec.name} model failed earlier: {self._error}")
        if self._model is None:
            try:
                self._build()
            except Exception as e:
                self._error = f"{type(e).__name__}: {e}"
                raise
        return self._model

    def _build(self) -> None:
        config = self.spec.config(self.toy)
        t0 = time.perf_counter()
        with PeakMemory(self.device) as mem:
            self._model = random_model(config, self.device, self.dtype)
        self.tokenizer = id_tokenizer(config)
        self.info = {
            "name": self.spec.name, "shape_of": self.spec.params, "toy": self.toy, "dtype": str(self.dtype).split(".")[-1],
            "parameters": sum(p.numel() for p in self._model.parameters()),
            "config": {k: getattr(config, k) for k in ("model_type", "hidden_size", "intermediate_size",
                                                        "num_hidden_layers", "num_attention_heads",
                                                        "num_key_value_heads", "vocab_size", "tie_word_embeddings")},
            "attn_implementation": self._model.config._attn_implementation,
            "build_seconds": round(time.perf_counter() - t0, 2), "weights_mib": mem.figures()["peak_memory_mib"],
        }

    def engine(self, seed: Optional[int] = None) -> TransformersEngine:
        return TransformersEngine(self.model, self.tokenizer, EngineConfig(temperature=1.0, ignore_eos=True),
                                  seed=self.seed if seed is None else seed)

    def close(self) -> None:
        """Drop the model and the trees and hand their memory back (the next shape needs it)."""
        self._model = self.trees = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- the parts --------------------------------------------------------------------------
    def rollout(self, report: dict) -> None:
        """Tree vs independent sampling of the same random prompts: wall time, tokens, peak memory."""
        s = self.sizes
        model = self.model
        report["model"] = self.info
        prompts = random_prompts(s.prompts, s.prompt_len, model.config.vocab_size, self.seed)
        engine = self.engine()
        report["decoder"] = engine.decoder.name
        warm = SamplerConfig(width=2, depth=2, segment_len=2, branching=2, answer_policy="none", rep_count=0)
        TreeSampler(warm, engine).rollout(prompts[:1])  # kernels, allocator, the lean decoder's first call
        report.update(prompts=s.prompts, prompt_len=s.prompt_len, width=s.width, depth=s.depth,
                      branching=s.branching, segment_len=s.segment_len)
        sides = {}
        for mode in ("tree", "independent"):
            cfg = SamplerConfig(mode=mode, width=s.width, depth=s.depth, segment_len=s.segment_len,
                                branching=s.branching, seed=self.seed, answer_policy="none", rep_count=0)
            with PeakMemory(self.device) as mem:
                result = TreeSampler(cfg, engine).rollout(prompts)
            summary = summarize([result], cfg)
            sides[mode] = summary
            report[mode] = {k: summary[k] for k in ("wall_seconds", "decoded_tokens", "leaf_tokens",
                                                    "decoded_tokens_per_second", "forward_passes",
                                                    "computed_decode_rows", "saving_vs_own_leaves")}
            report[mode].update(mem.figures())
            if mode == "tree":
                self.trees = result.trees
        both = compare_modes(sides["tree"], sides["independent"])
        report["speedup"] = both.get("speedup")
        report["measured_saving"] = both.get("measured_saving")

    def decode(self, report: dict) -> None:
        """Engine vs HF `generate`: new tokens/s of `decode_tokens` sampled tokens per row, prefill included."""
        s = self.sizes
        model = self.model
        report["model"] = self.info
        report.update(prompt_len=s.prompt_len, new_tokens=s.decode_tokens)
        for batch in s.decode_batches:
            prompts = random_prompts(batch, s.prompt_len, model.config.vocab_size, self.seed + batch)
            row: dict = {}
            for name, run in (("engine", self._engine_decode), ("generate", self._hf_generate)):
                run(prompts, 2)  # warm-up at this batch size
                with PeakMemory(self.device) as mem:
                    seconds, tokens = run(prompts, s.decode_tokens)
                row[name] = {"tokens_per_second": round(tokens / seconds, 1), "seconds": round(seconds, 3),
                             "new_tokens": tokens, **mem.figures()}
            row["engine"]["decoder"] = self._decoder
            row["engine_vs_generate"] = round(row["engine"]["tokens_per_second"] / row["generate"]["tokens_per_second"], 3)
            report[f"batch_{batch}"] = row

    def _engine_decode(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, int]:
        engine = self.engine()
        self._decoder = engine.decoder.name
        requests = [SegmentRequest(g, (0,), (tuple(p),), new_tokens) for g, p in enumerate(prompts)]
        _sync(self.device)
        start = time.perf_counter()
        outputs = engine.generate(requests)  # returns host lists: the device work is done
        seconds = time.perf_counter() - start
        return seconds, sum(len(o.token_ids) for o in outputs)

    def _hf_generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, int]:
        ids = torch.tensor(prompts, device=self.device)  # [B, P] equal lengths: no padding
        pad = self.tokenizer.pad_token_id
        _sync(self.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_p=1.0,
                                      top_k=0, pad_token_id=pad)  # [B, P + new]
        _sync(self.device)
        seconds = time.perf_counter() - start
        return seconds, (out.shape[1] - ids.shape[1]) * ids.shape[0]

    def training_pass(self, report: dict) -> None:
        """Packed vs flat forward + PPO-loss backward, one tree per pass, on the w=16 trees."""
        s = self.sizes
        model = self.model
        report["model"] = self.info
        if self.trees is None:  # the rollout part failed or did not run: grow the trees here
            cfg = SamplerConfig(width=s.width, depth=s.depth, segment_len=s.segment_len, branching=s.branching,
                                seed=self.seed, answer_policy="none", rep_count=0)
            prompts = random_prompts(s.prompts, s.prompt_len, model.config.vocab_size, self.seed)
            self.trees = TreeSampler(cfg, self.engine()).rollout(prompts).trees
        trees = self.trees[: s.train_trees]
        pad = self.tokenizer.pad_token_id
        model.train()
        try:
            per_tree = [tree_samples(t, k) for k, t in enumerate(trees)]
            self._pass(per_tree[0], "packed", pad)  # warm-up
            times = {"flat": [], "packed": []}
            ratios, max_diff = [], 0.0
            for samples in per_tree:
                for _ in range(s.repeats):
                    tf, lf = self._pass(samples, "flat", pad)
                    tp, lp = self._pass(samples, "packed", pad)
                    times["flat"].append(tf)
                    times["packed"].append(tp)
                    ratios.append(tf / tp)
                    mask = collate(samples, pad).response_mask
                    max_diff = max(max_diff, float((lf - lp).abs()[mask].max()))
            largest = max(per_tree, key=lambda x: sum(len(q.prompt_ids) + len(q.response_ids) for q in x))
            packed = pack_samples(largest, pad)
            report.update(width=s.width, trees=len(trees), repeats=s.repeats,
                          flat_seconds_median=round(statistics.median(times["flat"]), 4),
                          packed_seconds_median=round(statistics.median(times["packed"]), 4),
                          speedup=round(statistics.median(ratios), 3),
                          packed_tokens_largest=packed.packed_tokens, flat_tokens_largest=packed.flat_tokens,
                          max_logprob_diff=max_diff)
            for mode in ("flat", "packed"):  # one pass of the largest tree, alone
                with PeakMemory(self.device) as mem:
                    self._pass(largest, mode, pad)
                report[f"{mode}_memory"] = mem.figures()
        finally:
            model.zero_grad(set_to_none=True)
            model.eval()

    def _pass(self, samples: list[Sample], mode: str, pad_id: int) -> tuple[float, torch.Tensor]:
        """Seconds of one forward + PPO loss + backward, and the log-probs [S, R] on the CPU."""
        model = self.model
        model.zero_grad(set_to_none=True)
        _sync(self.device)
        start = time.perf_counter()
        if mode == "flat":
            batch = collate(samples, pad_id).to(self.device)
            logp, _ = response_logprobs(model, batch)
        else:
            packed = pack_samples(samples, pad_id, dtype=self.dtype).to(self.device)
            batch = packed.flat
            logp, _ = packed_logprobs(model, packed)
        parts = ppo_loss(logp, batch.old_logprobs, batch.advantages, batch.response_mask,
                         float(batch.response_mask.sum()))
        parts.loss.backward()
        _sync(self.device)
        return time.perf_counter() - start, logp.detach().float().cpu()




def sizes_dict(sizes: SpeedSizes) -> dict:
    return asdict(sizes)
