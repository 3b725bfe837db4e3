"""Trees as the rows a trainer library sees: one row per particle (TRL's GRPOTrainer, verl's PPO trainer).

A library that trains on `width` completions per prompt gets each tree's leaves as `width` rows, a leaf
repeated for the particles it stands for (once each without particles), so the rows are `width` exact
draws. Here

- `completions` turns the trees into rows: token ids (EOS included) and sampled-token log-probs;
- `row_advantages` gives each row treepo's per-token advantages for the rows' rewards, exactly as
  `treepo train` builds them (`treepo.train.update.build_samples`);
- `tree_metrics` is what an adapter logs about a rollout.

Plain functions over `PromptTree`s: no adapter's library is imported here.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from ..config import SamplerConfig
from ..rollout.accounting import summarize
from ..rollout.sampler import RolloutResult
from ..train.update import build_samples
from ..tree import PromptTree


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
