"""What tree sampling saved (spec section 4), measured and structural.

- leaf tokens: the sum of the trajectories' response lengths, i.e. what independent sampling
  decodes for the same leaves;
- decoded tokens: unique generated tokens (each segment once);
- saving ratio = 1 - decoded / leaf.

The structural bound is the saving of the ideal tree for a config: every path runs to full depth
with full segments, so the tree forks by `children_total` until it holds `width` paths. For a
full b-ary tree (width = fanout * b^(d-1)) it is the spec's 1 - b(1 - b^-d) / ((b - 1) d).
Where branching alone cannot reach `width` leaves by depth d, the missing leaves are counted at
their cheapest (one regrown segment each). A run with no early stops (e.g. `--ignore-eos`, no
answer or repetition stops) saves exactly this; early stops move the measured saving either way
(budget transfer gives a finished path's forks to the survivors).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from .config import SamplerConfig
from .sampler import RolloutResult, children_total


def ideal_segments(width: int, depth: int, branching: int, fanout: int) -> int:
    """Segments decoded by the ideal tree with root fan-out `fanout`."""
    paths, total = fanout, 0
    for level in range(1, depth + 1):
        total += paths
        if level < depth:
            paths = children_total(paths, 0, width, branching)
    return total + (width - paths)


def bound_saving_ratio(cfg: SamplerConfig) -> float:
    """Structural decoded-token saving for the config (averaged over a random root fan-out range)."""
    if cfg.mode == "independent":
        return 0.0
    lo, hi = cfg.root_fanout_range
    ratios = [
        1.0 - ideal_segments(cfg.width, cfg.depth, cfg.branching, f) / (cfg.width * cfg.depth)
        for f in range(lo, hi + 1)
    ]
    return sum(ratios) / len(ratios)


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
        "saving_ratio": round(1.0 - decoded / leaf, 6) if leaf else 0.0,
        "bound_saving_ratio": round(bound_saving_ratio(cfg), 6),
        "trajectories_per_second": round(n_traj / wall, 3) if wall else 0.0,
        "decoded_tokens_per_second": round(decoded / wall, 2) if wall else 0.0,
        "leaf_tokens_per_second": round(leaf / wall, 2) if wall else 0.0,
        "mean_response_tokens": round(leaf / n_traj, 2) if n_traj else 0.0,
        "segments": sum(len(t.nodes) for t in trees),
        "fallbacks": sum(t.fallbacks for t in trees),
        "finish_reasons": dict(sorted(reasons.items())),
    }
