"""Correctness on any device: the CPU tests' exactness checks as functions that fill a report.

Each check is `check(device, dtype, report, check_every=None)`: it runs on the tests' tiny random
models (`treepo.tiny`) moved to `device` in `dtype`, writes its figures into `report` as it goes,
and raises `CheckFailed` naming the first mismatch (the figures so far stay in the report).
`check_every` overrides the engine's host-sync cadence (the CPU dry run sets 4, CUDA's default).
`python -m treepo.gpu_check` and the `pytest -m cuda` tests (tests/test_gpu_check.py) both call them.

Tolerances (`tolerance`): on the CPU in float32 those of the CPU tests; on CUDA in float32 ten
times looser (other kernels, other reduction orders; TF32 stays off); in bfloat16 loose bounds
that still catch a wrong mask or a wrong row (a wrong token's log-prob is off by nats).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import tiny
from ..config import EngineConfig, RewardConfig, SamplerConfig, TrainConfig
from ..engines.transformers_engine import TransformersEngine
from ..rollout.sampler import TreeSampler
from ..train.logprobs import Sample, collate, response_logprobs
from ..train.loss import ppo_loss
from ..train.packing import pack_samples, packed_logprobs


class CheckFailed(AssertionError):
    """A correctness check found a mismatch; the message names where and by how much."""


@dataclass(frozen=True)
class Tolerance:
    logprob: float  # nats, largest |engine or packed - reference| per token
    grad: float  # largest |packed - flat| / max|flat| per parameter tensor (float32)
    grad_cosine: float  # least cosine between packed and flat gradients, all parameters at once
    tie: float  # bfloat16 greedy: a divergence counts as a near-tie when the logit gap is below tie * max|logit|


def tolerance(device: torch.device, dtype: torch.dtype) -> Tolerance:
    if dtype == torch.float32:
        loose = 1.0 if device.type == "cpu" else 10.0
        return Tolerance(logprob=1e-4 * loose, grad=1e-4 * loose, grad_cosine=1 - 1e-6, tie=0.0)
    return Tolerance(logprob=0.1, grad=math.inf, grad_cosine=0.99, tie=0.05)


def tiny_model(kind: str, device: torch.device, dtype: torch.dtype, **overrides):
    """The tests' tiny random model of `kind` ('llama', 'qwen2', 'qwen3', 'gpt2') on `device` in `dtype`."""
    return tiny.model(kind, **overrides).to(device=device, dtype=dtype)


def make_engine(model, check_every: Optional[int] = None, seed: int = 0, **cfg) -> TransformersEngine:
    engine = TransformersEngine(model, tiny.tokenizer(), EngineConfig(**cfg), seed=seed)
    if check_every:
        engine._check_every = check_every
    return engine


# ---------------------------------------------------------------------------------------------
# References by full forward passes (shared with tests/test_engine.py and tests/test_packing.py)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def full_forward_logprobs(model, prompt, response, temperature=1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs [R], entropies [R]) of `response` after `prompt` from one uncached forward, on the CPU."""
    ids = torch.tensor([list(prompt) + list(response)], device=model.device)  # [1, P + R]
    logits = model(ids).logits[0, len(prompt) - 1 : -1].float()  # [R, V] predicting each response token
    logp = torch.log_softmax(logits / temperature if temperature > 0 else logits, -1)
    picked = logp.gather(-1, torch.tensor(list(response), device=logp.device)[:, None]).squeeze(-1)  # [R]
    return picked.cpu(), torch.special.entr(logp.exp()).sum(-1).cpu()


@torch.no_grad()
def greedy_reference(model, context, n) -> list[int]:
    """Greedy continuation by full forward passes: no cache, no EOS handling (the engines run with ignore_eos)."""
    ids = list(context)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids], device=model.device)).logits[0, -1].argmax()))
    return ids[len(context):]


@torch.no_grad()
def divergence(model, context, a, b) -> tuple[int, Optional[float], Optional[float]]:
    """(tokens `a` and `b` agree on before they differ, |logit gap| of their first differing tokens,
    max |logit| there) under one uncached forward of `model`; gap and scale are None when they agree."""
    agreed = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    if agreed == min(len(a), len(b)):
        return agreed, None, None
    ids = torch.tensor([list(context) + list(a[:agreed])], device=model.device)  # [1, C + agreed]
    logits = model(ids).logits[0, -1].float()  # [V] the distribution both tokens were drawn from
    return agreed, float((logits[a[agreed]] - logits[b[agreed]]).abs()), float(logits.abs().max())


def loss_and_grads(model, forward: Callable, normaliser: float):
    """(log-probs, entropies, loss, {name: gradient}) of one PPO-loss backward through `forward()`,
    which returns (log-probs [S, R], entropies [S, R], the flat batch of the same samples)."""
    model.zero_grad(set_to_none=True)
    logp, ent, batch = forward()
    parts = ppo_loss(logp, batch.old_logprobs, batch.advantages, batch.response_mask, normaliser,
                     entropy=ent, entropy_coef=0.01)
    parts.loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logp.detach(), ent.detach(), parts.loss.detach(), grads


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------

GREEDY_MODELS = (("llama", "lean"), ("llama", "hf"), ("qwen2", "lean"), ("qwen3", "lean"))
GREEDY_SHAPE = dict(width=4, depth=4, segment_len=8, branching=2, answer_policy="none", rep_count=0)
DIVERGENCES_LISTED = 8


def _tally() -> dict:
    return dict(pairs=0, identical=0, min_agreed_tokens=None)


def greedy_tree_equals_independent(device, dtype, report: dict, check_every: Optional[int] = None) -> None:
    """Greedy tree leaves equal greedy independent samples and an uncached greedy reference, token
    for token. float32: exactly. bfloat16: each first divergence must sit at a near-tie of the two
    tokens' logits; reported are the tokens agreed before it and the logit gap there.

    Report: `tree_vs_independent` and `vs_reference` (pairs, identical, least tokens agreed), the
    same per model in `by_model`, and `divergences`: each distinct first divergence (model, prompt,
    tokens agreed, logit gap, max |logit|) with the pairs that share it.
    """
    tol = tolerance(device, dtype)
    tokens = GREEDY_SHAPE["depth"] * GREEDY_SHAPE["segment_len"]
    report.update(tokens_per_path=tokens, models=[f"{k}/{b}" for k, b in GREEDY_MODELS],
                  tree_vs_independent=_tally(), vs_reference=_tally(), max_gap_at_divergence=None,
                  near_tie_tolerance=tol.tie or "exact", divergences=[], by_model={})
    seen: dict[tuple, dict] = {}
    for kind, backend in GREEDY_MODELS:
        name = f"{kind}/{backend}"
        model = tiny_model(kind, device, dtype)
        engines = [make_engine(model, check_every, temperature=0.0, ignore_eos=True, backend=backend) for _ in (0, 1)]
        if engines[0].decoder.name != backend:
            raise CheckFailed(f"{name}: the engine chose the {engines[0].decoder.name} decoder")
        report["host_sync_every"] = engines[0]._check_every  # decode steps between stop checks
        prompts = tiny.prompts()
        tree = TreeSampler(SamplerConfig(**GREEDY_SHAPE), engines[0]).rollout(prompts)
        ind = TreeSampler(SamplerConfig(mode="independent", **GREEDY_SHAPE), engines[1]).rollout(prompts)
        mine = report["by_model"][name] = dict(tree_vs_independent=_tally(), vs_reference=_tally(),
                                               tree_decoded=sum(t.decoded_tokens for t in tree.trees),
                                               independent_decoded=sum(t.decoded_tokens for t in ind.trees))
        for p, (t_tree, t_ind, prompt) in enumerate(zip(tree.trees, ind.trees, prompts)):
            reference = greedy_reference(model, prompt, tokens)
            leaves = [t.token_ids for t in t_tree.trajectories()]
            samples = [t.token_ids for t in t_ind.trajectories()]
            pairs = [("tree_vs_independent", f"leaf {i} vs sample {i}", a, b) for i, (a, b) in enumerate(zip(leaves, samples))]
            pairs += [("vs_reference", f"leaf {i} vs reference", a, reference) for i, a in enumerate(leaves)]
            pairs += [("vs_reference", f"sample {i} vs reference", b, reference) for i, b in enumerate(samples)]
            for kind_of_pair, what, a, b in pairs:
                agreed, gap, scale = divergence(model, prompt, a, b)
                same = gap is None and len(a) == len(b) == tokens
                for r in (report[kind_of_pair], mine[kind_of_pair]):
                    r["pairs"] += 1
                    r["identical"] += int(same)
                    r["min_agreed_tokens"] = min(agreed, r["min_agreed_tokens"] if r["min_agreed_tokens"] is not None
                                                 else agreed)
                if same:
                    continue
                where = f"{name} prompt {p}, {what}"
                if gap is None:
                    raise CheckFailed(f"{where}: lengths {len(a)} and {len(b)}, expected {tokens} tokens each")
                report["max_gap_at_divergence"] = max(report["max_gap_at_divergence"] or 0.0, gap)
                key = (name, p, agreed, round(gap, 5))
                if key not in seen and len(seen) < DIVERGENCES_LISTED:
                    seen[key] = dict(model=name, prompt=p, agreed_tokens=agreed, logit_gap=round(gap, 5),
                                     max_abs_logit=round(scale, 3), pairs=[])
                    report["divergences"].append(seen[key])
                if key in seen:
                    seen[key]["pairs"].append(what)
                if gap > tol.tie * max(1.0, scale):
                    raise CheckFailed(f"{where}: differ at token {agreed} of {tokens} with a logit gap of {gap:.3g} "
                                      f"(max |logit| {scale:.3g}): " + ("float32 must agree exactly" if not tol.tie
                                                                        else "not a near-tie"))
        if mine["tree_decoded"] >= mine["independent_decoded"]:
            raise CheckFailed(f"{name}: the tree decoded {mine['tree_decoded']} tokens, independent sampling "
                              f"{mine['independent_decoded']}: shared prefixes were decoded again")


LOGPROB_MODELS = (("llama", "lean"), ("llama", "hf"), ("qwen3", "lean"))


def engine_logprobs_match_forward(device, dtype, report: dict, check_every: Optional[int] = None) -> None:
    """The engine's sampled log-probs and entropies (temperature 0.8, top-p 0.9, EOS on) equal an
    uncached full forward of the same model, for every token of every trajectory."""
    tol = tolerance(device, dtype)
    report.update(tolerance=tol.logprob, trajectories=0, tokens=0, max_logprob_diff=0.0, max_entropy_diff=0.0,
                  by_model={})
    cfg = SamplerConfig(width=6, depth=3, segment_len=6, branching=2, seed=3, answer_policy="none", rep_count=0)
    for kind, backend in LOGPROB_MODELS:
        name = f"{kind}/{backend}"
        model = tiny_model(kind, device, dtype)
        engine = make_engine(model, check_every, temperature=0.8, top_p=0.9, backend=backend)
        report["host_sync_every"] = engine._check_every
        result = TreeSampler(cfg, engine).rollout(tiny.prompts())
        worst = 0.0
        for tree in result.trees:
            for traj in tree.trajectories():
                lp, ent = full_forward_logprobs(model, tree.prompt_ids, traj.token_ids, 0.8)
                d_lp = float((torch.tensor(traj.logprobs) - lp).abs().max())
                d_ent = float((torch.tensor(traj.entropies) - ent).abs().max())
                report["trajectories"] += 1
                report["tokens"] += len(traj.token_ids)
                report["max_logprob_diff"] = max(report["max_logprob_diff"], d_lp)
                report["max_entropy_diff"] = max(report["max_entropy_diff"], d_ent)
                worst = max(worst, d_lp, d_ent)
                if not max(d_lp, d_ent) <= tol.logprob:
                    raise CheckFailed(f"{name} prompt {tree.prompt_index}, leaf {list(traj.node_path[-1])}: engine "
                                      f"log-probs / entropies differ from a full forward by {d_lp:.3g} / {d_ent:.3g} "
                                      f"(tolerance {tol.logprob:g})")
        report["by_model"][name] = round(worst, 7)


def flat_and_packed(model, samples: list[Sample], *, device="cpu", dtype=torch.float32, max_tokens: int = 150,
                    attention: str = "dense"):
    """(flat batch, packed batch, flat pass, packed pass): each pass is (log-probs, entropies, PPO loss,
    gradients) of the same samples, one padded row each vs tree-packed rows of at most `max_tokens`
    whose tree mask takes the form `attention` (packing.ATTENTION)."""
    normaliser = float(sum(len(s.response_ids) for s in samples))
    flat = collate(samples, 0).to(device)
    packed = pack_samples(samples, 0, dtype=dtype, max_tokens=max_tokens, attention=attention).to(device)

    def run_flat():
        lp, ent = response_logprobs(model, flat, with_entropy=True)
        return lp, ent, flat

    def run_packed():
        lp, ent = packed_logprobs(model, packed, with_entropy=True)
        return lp, ent, packed.flat

    return flat, packed, loss_and_grads(model, run_flat, normaliser), loss_and_grads(model, run_packed, normaliser)


PACKING_MODELS = (("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"))


def random_samples(trees, seed: int = 0) -> list[Sample]:
    """Every trajectory as a sample with random advantages and old log-probs (one group per tree)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, t in enumerate(trees):
        for leaf in t.leaves:
            r = t.response_ids(leaf)
            adv = torch.randn(len(r), generator=g).tolist()
            old = (-torch.rand(len(r), generator=g) * 3).tolist()
            out.append(Sample(t.prompt_ids, r, adv, old, group=k, meta={"prompt": t.prompt_index}))
    return out


def packed_equals_flat(device, dtype, report: dict, check_every: Optional[int] = None) -> None:
    """Tree-packed log-probs, entropies, PPO loss and gradients equal the flat rows' (sdpa and eager
    attention, the packed rows split over several rows), on trees from a real rollout on the device."""
    tol = tolerance(device, dtype)
    report.update(tolerance_logprob=tol.logprob, tolerance_grad=tol.grad, min_grad_cosine=tol.grad_cosine,
                  by_model={})
    # the dense mask on every model; the block-mask forms (FlexAttention's kernel on CUDA, treepo's
    # block-sparse kernel anywhere) on the first, as packed training picks them first
    block_forms = ("flex", "blocks") if torch.device(device).type == "cuda" else ("blocks",)
    runs = [(kind, attn, "dense") for kind, attn in PACKING_MODELS]
    runs += [(*PACKING_MODELS[0], form) for form in block_forms]
    for kind, attn, form in runs:
        name = f"{kind}/{attn}" + ("" if form == "dense" else f"/{form}")
        model = tiny_model(kind, device, dtype, attn_implementation=attn)
        engine = make_engine(model, check_every, seed=1, temperature=1.0)
        trees = TreeSampler(SamplerConfig(width=6, depth=4, segment_len=5, seed=2), engine).rollout(
            tiny.prompts()).trees
        flat, packed, (lp_f, ent_f, loss_f, g_f), (lp_p, ent_p, loss_p, g_p) = flat_and_packed(
            model, random_samples(trees), device=device, dtype=dtype, attention=form)
        m = flat.response_mask
        if g_f.keys() != g_p.keys() or not g_f:
            raise CheckFailed(f"{name}: packed and flat passes reached different parameters")
        rel = {k: float((g_f[k].float() - g_p[k].float()).abs().max() / g_f[k].float().abs().max().clamp_min(1e-8))
               for k in g_f}
        vf = torch.cat([g.float().flatten() for g in g_f.values()])
        vp = torch.cat([g_p[k].float().flatten() for k in g_f])
        mine = report["by_model"][name] = dict(
            rows=packed.input_ids.shape[0], packed_tokens=packed.packed_tokens, flat_tokens=packed.flat_tokens,
            max_logprob_diff=float((lp_f - lp_p).abs()[m].max()), max_entropy_diff=float((ent_f - ent_p).abs()[m].max()),
            loss_diff=float((loss_f - loss_p).abs()), max_grad_rel_diff=max(rel.values()),
            worst_grad=max(rel, key=rel.get), grad_cosine=float(torch.nn.functional.cosine_similarity(vf, vp, dim=0)))
        if mine["rows"] < 2 or packed.packed_tokens >= packed.flat_tokens:
            raise CheckFailed(f"{name}: expected several packed rows with fewer tokens than flat: {mine}")
        if not max(mine["max_logprob_diff"], mine["max_entropy_diff"]) <= tol.logprob:
            raise CheckFailed(f"{name}: packed log-probs / entropies differ from flat by {mine['max_logprob_diff']:.3g}"
                              f" / {mine['max_entropy_diff']:.3g} (tolerance {tol.logprob:g})")
        if not mine["max_grad_rel_diff"] <= tol.grad:
            raise CheckFailed(f"{name}: packed gradient of {mine['worst_grad']} differs from flat by "
                              f"{mine['max_grad_rel_diff']:.3g} of its largest entry (tolerance {tol.grad:g})")
        if not mine["grad_cosine"] >= tol.grad_cosine:
            raise CheckFailed(f"{name}: packed and flat gradients have cosine {mine['grad_cosine']:.6f} "
                              f"(at least {tol.grad_cosine} expected)")




def two_training_steps(device, dtype, report: dict, check_every: Optional[int] = None) -> None:
    """`Trainer.train()` for 2 steps on a tiny model on the device (tree rollouts, tree-packed PPO
    through sdpa, AdamW): every step trains, packed, with finite gradients, and the parameters move."""
    from ..train.trainer import Trainer  # here, so a missing accelerate fails this check alone

    model = tiny_model("llama", device, dtype)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory(prefix="treepo-gpu-check-") as tmp:
        prompts = tiny.write_prompts(Path(tmp) / "prompts.jsonl", 12)
        metrics = Path(tmp) / "run" / "metrics.jsonl"
        trainer = Trainer(
            EngineConfig(device=str(device)), SamplerConfig(width=4, depth=2, segment_len=8),
            RewardConfig(reward="treepo.tiny:letter_share"),
            TrainConfig(prompts=str(prompts), num_prompts=12, steps=2, prompts_per_step=2, micro_batch_size=3,
                        learning_rate=1e-3, out=str(Path(tmp) / "run"), checkpoint_every=0, tensorboard=False),
            model=model, tokenizer=tiny.tokenizer())
        if check_every:
            trainer.engine._check_every = check_every
        try:
            trainer.train()
        finally:  # the steps' figures, even when the run's end (model folder, plots) failed
            rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
            after = trainer.policy.state_dict()
            moved = [k for k in before if not torch.equal(before[k], after[k].to(before[k].device))]
            report.update(steps=len(rows), parameters_moved=f"{len(moved)} of {len(before)}",
                          device_of_parameters=str(next(trainer.policy.parameters()).device),
                          rows=[{k: r.get(k) for k in ("step", "loss", "grad_norm", "reward_mean", "groups_trained",
                                                       "packed", "packing_fallbacks", "forward_tokens", "flat_tokens",
                                                       "step_seconds")} for r in rows])
    if len(rows) != 2:
        raise CheckFailed(f"expected 2 metric rows, got {len(rows)}")
    for r in rows:
        if not r.get("groups_trained"):
            raise CheckFailed(f"step {r['step']}: no group trained (all rewards equal?)")
        if not (r.get("grad_norm") is not None and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0):
            raise CheckFailed(f"step {r['step']}: gradient norm {r.get('grad_norm')}")
        if not r.get("packed") or r.get("packing_fallbacks"):
            raise CheckFailed(f"step {r['step']}: training ran flat (packed={r.get('packed')}, "
                              f"fallbacks={r.get('packing_fallbacks')}); see the log for the reason")
    if not moved:
        raise CheckFailed("two training steps left every parameter unchanged")
    if next(trainer.policy.parameters()).device.type != device.type:
        raise CheckFailed(f"the policy trained on {next(trainer.policy.parameters()).device}, not {device}")


CHECKS: dict[str, Callable] = {
    "greedy": greedy_tree_equals_independent,
    "logprobs": engine_logprobs_match_forward,
    "packing": packed_equals_flat,
    "training": two_training_steps,
}
