"""Evaluation: k samples per problem, tree or independent, scored as mean@k / pass@k / maj@k.

`evaluate` is what both `treepo eval` (`eval/job.py`) and the trainer's held-out evaluation call.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Callable, Optional, Sequence

from ..config import SamplerConfig
from ..engines.base import Engine
from ..envs import system_prompt_with
from ..errors import InputError, RewardError
from ..prompts import Prompt, render
from ..rewards.scorers import FailureTally, RewardFunction
from ..rewards.scoring import score_trees
from ..rollout.accounting import summarize
from ..rollout.sampler import RolloutPlan, TreeSampler
from ..rollout.shape import batches
from ..rollout.stopping import answer_predicate
from .metrics import summarize_eval


def evaluate(
    engine: Engine,
    sampler_cfg: SamplerConfig,
    prompts: Sequence[Prompt],
    reward_fn: RewardFunction,
    *,
    system_prompt: str,
    k: int = 0,
    batch_size: int = 8,
    on_batch: Optional[Callable[[int], None]] = None,
    on_plan: Optional[Callable[[RolloutPlan], None]] = None,
    max_failure_share: float = 1.0,
    strict: bool = True,
) -> tuple[dict, list[dict]]:
    """(summary, per-sample rows) for `prompts`, `sampler_cfg.width` samples each.

    Raises RewardError when the reward failed on more than `max_failure_share` of the samples (with the
    default 1, only when it failed on all of them): such a table would measure the failures, not the model.
    `strict=False` (the trainer's held-out evaluation, run by rank 0 alone, where a raise would leave the other
    ranks waiting) skips the memory refusal and the failure stop; failures are still counted in the summary.
    """
    sampler = TreeSampler(sampler_cfg, engine, predicate=answer_predicate(sampler_cfg))
    system_prompt = system_prompt_with(system_prompt, sampler.env)
    ids = [render(p, engine.tokenizer, system_prompt) for p in prompts]
    for i, p in enumerate(ids):
        sampler.check_fits(p, i)
    k = check_k(k, sampler_cfg.width)
    plan = sampler.plan([len(p) for p in ids], batch_size) if strict else None  # a KV cache that cannot fit is refused
    if on_plan and plan is not None:
        on_plan(plan)
    problems, rows, results, failures = [], [], [], Counter()
    tally = FailureTally()
    for start, end in batches(len(ids), batch_size, sampler.shaper):
        t0 = time.perf_counter()
        result = sampler.rollout(ids[start:end], first_index=start)
        scored, fails = score_trees(result.trees, prompts, reward_fn, engine, tally)
        seconds = time.perf_counter() - t0
        failures.update(fails)
        results.append(result)
        for j, tree in enumerate(result.trees):
            s = scored[j]
            # A particle tree's leaf stands for `multiplicity` of the width draws (each an exact draw from the
            # policy), so the metrics count it that many times: mean@k is then unbiased for the policy's accuracy.
            counts = tree.leaf_counts()
            problems.append({"correct": [ok for ok, m in zip(s["correct"], counts) for _ in range(m)],
                             "answers": [a for a, m in zip(s["answers"], counts) for _ in range(m)],
                             "decoded_tokens": tree.decoded_tokens, "distinct_leaves": len(tree.leaves),
                             "wall_seconds": seconds / len(result.trees)})
            p = prompts[tree.prompt_index]
            for leaf, text, ok, ans, m in zip(tree.leaves, s["texts"], s["correct"], s["answers"], counts):
                rows.append({"prompt_index": tree.prompt_index, "question": p.question, "reference": p.answer,
                             "node_path": list(leaf), "multiplicity": m, "completion": text, "answer": ans,
                             "correct": ok, "reward": tree.rewards[leaf],
                             "finish_reason": tree.nodes[leaf].finish_reason})
        if on_batch:
            on_batch(len(result.trees))
    if strict:
        check_failures(tally, reward_fn.name, max_failure_share)
    summary = summarize_eval(problems, k)
    rollout = summarize(results, sampler_cfg)
    summary.update({
        "mode": sampler_cfg.mode,
        "width": sampler_cfg.width,
        "leaf_tokens": rollout["leaf_tokens"],
        "saving_vs_own_leaves": rollout["saving_vs_own_leaves"],
        "estimated_saving_vs_independent": rollout["estimated_saving_vs_independent"],
        "distinct_leaves_per_group": rollout["distinct_leaves_per_group"],
        # A particle tree's leaf counts once per particle: exact draws, so mean@k is unbiased, but draws that
        # share a leaf are one answer repeated, so pass@k and maj@k read lower than k independent samples'.
        "pass_maj_from_repeated_draws": any(max(t.multiplicity() or [1]) > 1 for r in results for t in r.trees),
        "shapes": [r.shape.as_dict() for r in results if r.shape is not None],
        "reward_failures": dict(failures),
        "reward_samples": tally.samples,
        "wall_seconds": sum(p["wall_seconds"] for p in problems),
    })
    return summary, rows


def check_failures(tally: FailureTally, name: str, max_share: float) -> None:
    """RewardError when more than `max_share` of the samples failed to score (1: only when all of them did)."""
    if not tally.samples or not tally.failed:
        return
    if tally.failed == tally.samples or tally.failed > max_share * tally.samples:
        why = "every sample failed" if tally.failed == tally.samples else f"more than {max_share:.0%} failed"
        raise RewardError(f"{tally.error_text(name, 'of the evaluation')}. It stopped without writing results: "
                          f"{why} (--max_failure_share sets the share allowed).")


def check_k(k: int, width: int) -> int:
    """k for mean@k / pass@k / maj@k (0 = width); it cannot exceed the samples per problem."""
    if k > width:
        raise InputError(f"k={k} exceeds width={width}: mean@k needs k samples per problem; raise --width or lower --k.")
    return k or width
