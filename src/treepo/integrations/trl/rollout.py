"""The TRL-facing side of a tree rollout, as plain functions (no TRL import, tested on their own).

TRL hands the trainer its generation batch as rows, each prompt repeated `num_generations` times in
a run of consecutive rows (its RepeatSampler). Here

- `prompt_groups` turns those rows into one prompt per tree (and checks the runs are whole);
- `completions` turns the trees back into rows, `width` per tree: each leaf as many rows as the particles
  it holds (once each without particles), with its token ids (EOS included, as TRL's own generation keeps
  it) and sampled-token log-probs, so TRL sees `num_generations` exact draws per prompt, some repeated;
- `row_advantages` gives each row treepo's per-token advantages for the rows' rewards, exactly as
  `treepo train` builds them (`treepo.train.update.build_samples`);
- `tree_metrics` is what the trainer logs about the trees.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from ...config import SamplerConfig
from ...rollout.accounting import summarize
from ...rollout.sampler import RolloutResult
from ...train.update import build_samples
from ...tree import PromptTree


def prompt_groups(prompt_ids: Sequence[Sequence[int]], width: int) -> list[list[int]]:
    """One prompt per run of `width` identical consecutive rows; an error names a broken run."""
    if len(prompt_ids) % width:
        raise RuntimeError(
            f"the generation batch has {len(prompt_ids)} rows, not a multiple of num_generations={width}: "
            "each process must hold whole prompt groups (TreePOConfig checks per_device_train_batch_size * "
            "steps_per_generation; do not pass a custom sampler that splits them)."
        )
    groups = []
    for start in range(0, len(prompt_ids), width):
        run = [list(p) for p in prompt_ids[start : start + width]]
        if any(p != run[0] for p in run[1:]):
            raise RuntimeError(
                f"rows {start}..{start + width - 1} of the generation batch are not one prompt repeated "
                f"num_generations={width} times: TreePO grows each prompt's completions as one tree and needs "
                "TRL's RepeatSampler order (whole groups on one process)."
            )
        groups.append(run[0])
    return groups


def completions(trees: Sequence[PromptTree]) -> tuple[list[list[int]], list[list[float]]]:
    """(completion ids, sampled-token log-probs) per row: each tree's leaves in order, each leaf repeated
    for its particles, tree after tree."""
    ids, logps = [], []
    for tree in trees:
        for leaf, m in zip(tree.leaves, tree.leaf_counts()):
            traj = tree.trajectory(leaf)
            ids += [list(traj.token_ids) for _ in range(m)]
            logps += [list(traj.logprobs) for _ in range(m)]
    return ids, logps


def row_advantages(trees: Sequence[PromptTree], rewards: Sequence[float], estimator: str, whitening: str,
                   reduce_sum: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> list[list[float]]:
    """Per row (the `completions` order), one advantage per completion token.

    The rewards are set on the trees and the advantages built by treepo's own `build_samples`
    (estimator, then the batch's whitening), so they equal `treepo train`'s for the same trees. A
    NaN reward (every TRL reward function returned None) takes its group's mean reward for the
    estimator and gets advantage 0, as TRL zeroes an unscorable completion's advantage.

    A leaf repeated for its m particles takes the mean of its rows' rewards, and each of its rows gets
    the leaf's advantage / m x width / leaves: `build_samples` weighs a leaf by m x leaves / width (mean 1
    over the leaves), and TRL's loss already counts the m rows, so each row is one particle of weight 1.
    """
    rows = sum(sum(t.leaf_counts()) for t in trees)
    if len(rewards) != rows:
        raise ValueError(f"{len(rewards)} rewards for {rows} completions: give one per completion.")
    unscorable, at = [], 0
    for tree in trees:
        copies = tree.leaf_counts()
        values = [float(r) for r in rewards[at : at + sum(copies)]]
        known = [r for r in values if not math.isnan(r)]
        fill = sum(known) / len(known) if known else 0.0
        filled = [fill if math.isnan(r) else r for r in values]
        starts = [sum(copies[:i]) for i in range(len(copies))]
        tree.rewards = {leaf: sum(filled[a : a + m]) / m for leaf, a, m in zip(tree.leaves, starts, copies)}
        unscorable += [math.isnan(r) for r in values]
        at += sum(copies)
    samples = iter(build_samples(list(trees), estimator, whitening, reduce_sum))
    out = []
    for tree in trees:
        copies = tree.leaf_counts()
        for leaf, m in zip(tree.leaves, copies):  # build_samples keeps every leaf with tokens, in this order
            n = len(tree.response_ids(leaf))
            per_row = sum(copies) / (len(tree.leaves) * m)
            adv = [a * per_row for a in next(samples).advantages] if n else []
            out += [list(adv) for _ in range(m)]
    return [[0.0] * len(a) if bad else a for a, bad in zip(out, unscorable)]


def tree_metrics(result: RolloutResult, cfg: SamplerConfig) -> dict[str, float]:
    """What the trainer logs about one rollout (prefixed `treepo/` there)."""
    s = summarize([result], cfg)
    depths = [len(t.model_path(leaf)[0]) for t in result.trees for leaf in t.leaves]
    return {
        "decoded_tokens": float(s["decoded_tokens"]),  # unique tokens the engine sampled
        "leaf_tokens": float(s["leaf_tokens"]),  # the distinct leaves' answer tokens
        "particle_tokens": float(s["particle_tokens"]),  # num_generations draws with these answers would decode this
        "saving_vs_own_leaves": float(s["saving_vs_own_leaves"]),  # 1 - decoded / leaf
        "estimated_saving_vs_independent": float(s["estimated_saving_vs_independent"]),
        "distinct_leaves_per_group": float(s["distinct_leaves_per_group"]),
        "depth_mean": sum(depths) / len(depths) if depths else 0.0,
        "depth_max": float(max(depths, default=0)),
        "fallbacks": float(s["fallbacks"]),
        "segments": float(s["segments"]),
        "engine_rounds": float(s["engine_steps"]),
        "rollout_seconds": float(s["wall_seconds"]),
    }
