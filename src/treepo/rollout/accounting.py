"""What tree sampling saved, measured and structural.

- leaf tokens: the sum of the trajectories' response lengths (each leaf's whole path);
- decoded tokens: unique generated tokens (each segment once);
- `saving_vs_own_leaves` = 1 - decoded / leaf: the structural saving against the tree's *own* leaves.
  It is not a saving against independent sampling: tree leaves lean toward long paths (a node forks
  only `branching` ways, and budget transfer gives finished paths' forks to the survivors), so the
  same policy's independent answers are shorter where paths stop early. Only a run of both modes on
  the same prompts measures that (`compare_modes`, the benchmarks);
- `weighted_response_tokens`: the mean answer length the leaf weights (`tree.leaf_weights`) estimate
  for the policy itself, per prompt; `mean_response_tokens` is the raw mean over the distinct leaves;
- `shared_tokens` (S): the tokens shared prefixes saved, sum over nodes of (paths through it - 1) x its
  length; `particle_tokens`: sum over leaves of multiplicity x answer length, what the group's width
  draws with exactly these answers would decode. decoded = particle_tokens - shared_tokens exactly, so
  for a group `tree - independent = w (E_leaf[L] - E[L]) - S` with E_leaf the weighted leaf mean;
- `estimated_saving_vs_independent` = 1 - decoded / (group size x weighted mean answer length), summed
  over groups: the saving against independent sampling of the same width, estimated from the tree
  alone (for a particle tree 1 - decoded / particle_tokens = S / particle_tokens); a run of both modes
  measures it (`compare_modes`);
- `distinct_leaves_per_group` and `decoded_tokens_per_distinct_leaf`: what a saving bought with
  duplicated leaves costs (a particle tree has at most width distinct leaves, often fewer).

The structural bound is what this sampler saves for a config when no path stops early, against the
full-length answers its width particles stand for (its leaves, each counted multiplicity times): it runs
the sampler itself on `engines.simulated.HazardEngine(0)`, which always decodes full segments, so branching, the width
cap and fallbacks follow the configured rules exactly. For a full b-ary tree whose leaves all reach
depth d it is 1 - b(1 - b^-d) / ((b - 1) d) (53.1% for b=2, d=4, width 16). Where the config draws at random
(a root fan-out range, or fallback cuts with `fallback_policy=any`) it is the mean over 32 seeds.
A run without early stops saves exactly this; early stops move the measured saving either way
(budget transfer gives a finished path's forks to the survivors).
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import asdict, replace
from typing import Iterable

from ..config import SamplerConfig
from ..engines.simulated import HazardEngine
from ..tree import leaf_weights
from .sampler import RolloutResult, TreeSampler
from .shape import shaped_config

BOUND_SEEDS = 32


def bound_saving_ratio(cfg: SamplerConfig) -> float:
    """Structural decoded-token saving for the config (see the module docstring).

    Turn mode counts as fixed segments of max_turn_tokens, every turn full length and answered by
    the environment (whose tokens are never decoded, so they change neither figure).
    """
    if cfg.mode == "independent":
        return 0.0
    ideal = replace(cfg, shape="fixed", answer_policy="none", answer_predicate=None, rep_count=0, segment_mode="fixed",
                    segment_len=cfg.segment_cap, max_turn_tokens=0, stop_strings=[], env=None, env_args=None,
                    max_turns=0)
    return _bound(json.dumps(asdict(ideal), sort_keys=True))


@functools.lru_cache(maxsize=64)
def _bound(ideal_json: str) -> float:
    ideal = SamplerConfig(**json.loads(ideal_json))
    lo, hi = ideal.root_fanout_range
    seeds = BOUND_SEEDS if lo != hi or ideal.fallback_policy == "any" else 1
    savings = []
    for seed in range(seeds):
        tree = TreeSampler(replace(ideal, seed=seed), HazardEngine(0.0)).rollout([[0]]).trees[0]
        savings.append(1.0 - tree.decoded_tokens / tree.particle_tokens)  # = leaf_tokens without particles
    return sum(savings) / len(savings)


def _grown_bound(results: list[RolloutResult], cfg: SamplerConfig) -> float:
    """The structural bound of the shapes the rollouts grew (an adaptive shape's, per rollout), weighted by trees."""
    trees = sum(len(r.trees) for r in results)
    if not trees:
        return bound_saving_ratio(cfg)
    return sum(len(r.trees) * bound_saving_ratio(shaped_config(cfg, r.shape) if r.shape is not None else cfg)
               for r in results) / trees


def summarize(results: Iterable[RolloutResult], cfg: SamplerConfig) -> dict:
    """Counters of one or more rollouts (e.g. several prompt batches) as the summary.json record."""
    results = list(results)
    trees = [t for r in results for t in r.trees]
    leaf = sum(t.leaf_tokens for t in trees)
    decoded = sum(t.decoded_tokens for t in trees)
    wall = sum(r.wall_seconds for r in results)
    engine: Counter = Counter()
    for r in results:
        engine.update(r.engine_stats)
    reasons = Counter(t.nodes[leaf_id].finish_reason for t in trees for leaf_id in t.leaves)
    n_traj = sum(len(t.leaves) for t in trees)
    shared = sum(t.shared_tokens for t in trees)
    particle = sum(t.particle_tokens for t in trees)
    # Per group, the weighted mean answer length (model tokens): the policy's; x width = independent sampling's cost.
    weighted = [sum(w * t.model_tokens(x) for w, x in zip(leaf_weights(t.leaves, t.multiplicity()), t.leaves))
                for t in trees]
    independent_est = sum(t.group_size * mean for t, mean in zip(trees, weighted))
    env_nodes = [n for t in trees for n in t.nodes.values() if n.env]
    turns = sum(1 + sum(n.env for n in t.path(leaf_id)) for t in trees for leaf_id in t.leaves)
    return {
        "mode": cfg.mode,
        "prompts": len(trees),
        "trajectories": n_traj,
        "leaf_tokens": leaf,
        "decoded_tokens": decoded,
        "prefill_tokens": engine.get("prefill_tokens", 0),
        "engine_steps": sum(r.rounds for r in results),
        "forward_passes": engine.get("forward_passes", 0),
        "computed_decode_rows": engine.get("computed_decode_rows", 0),
        "wall_seconds": round(wall, 3),
        "saving_vs_own_leaves": round(1.0 - decoded / leaf, 6) if leaf else 0.0,
        "bound_saving_ratio": round(_grown_bound(results, cfg), 6),
        "trajectories_per_second": round(n_traj / wall, 3) if wall else 0.0,
        "decoded_tokens_per_second": round(decoded / wall, 2) if wall else 0.0,
        "leaf_tokens_per_second": round(leaf / wall, 2) if wall else 0.0,
        "mean_response_tokens": round(leaf / n_traj, 2) if n_traj else 0.0,
        "weighted_response_tokens": round(sum(weighted) / len(trees), 2) if trees else 0.0,
        "shared_tokens": shared,
        "particle_tokens": particle,
        "estimated_saving_vs_independent": round(1.0 - decoded / independent_est, 6) if independent_est else 0.0,
        "independent_tokens_estimate": round(independent_est, 2),
        "group_size": round(sum(t.group_size for t in trees) / len(trees), 3) if trees else 0.0,
        "distinct_leaves_per_group": round(n_traj / len(trees), 3) if trees else 0.0,
        "decoded_tokens_per_distinct_leaf": round(decoded / n_traj, 2) if n_traj else 0.0,
        "segments": sum(len(t.nodes) for t in trees) - len(env_nodes),
        "env_turns": len(env_nodes),  # environment replies in the trees (each once, however many leaves share it)
        "env_tokens": sum(len(n) for n in env_nodes),  # appended as context: prefilled, never decoded
        "env_errors": reasons.get("env_error", 0),
        "mean_turns": round(turns / n_traj, 3) if n_traj else 0.0,  # assistant turns per trajectory
        "fallbacks": sum(t.fallbacks for t in trees),
        "finish_reasons": dict(sorted(reasons.items())),
    }


SIDE_KEYS = ("decoded_tokens", "leaf_tokens", "wall_seconds", "mean_response_tokens", "weighted_response_tokens",
             "trajectories_per_second", "decoded_tokens_per_second", "saving_vs_own_leaves", "shared_tokens",
             "estimated_saving_vs_independent", "distinct_leaves_per_group", "decoded_tokens_per_distinct_leaf")


def compare_modes(tree: dict, independent: dict) -> dict:
    """The measured saving of tree over independent sampling, from two `summarize` records of the same prompts:
    each side's tokens, time and throughput, `measured_saving` = 1 - decoded(tree) / decoded(independent) and
    `speedup` = wall(independent) / wall(tree)."""
    out = {"tree": {k: tree[k] for k in SIDE_KEYS if k in tree},
           "independent": {k: independent[k] for k in SIDE_KEYS if k in independent}}
    d_ind, w_tree = independent["decoded_tokens"], tree["wall_seconds"]
    out["measured_saving"] = round(1.0 - tree["decoded_tokens"] / d_ind, 6) if d_ind else None
    out["speedup"] = round(independent["wall_seconds"] / w_tree, 4) if w_tree else None
    return out
