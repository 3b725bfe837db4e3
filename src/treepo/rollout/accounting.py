"""What tree sampling saved, measured and structural.

- leaf tokens: the sum of the trajectories' response lengths, i.e. what independent sampling
  decodes for the same leaves;
- decoded tokens: unique generated tokens (each segment once);
- saving ratio = 1 - decoded / leaf.

The structural bound is what this sampler saves for a config when no path stops early: it runs
the sampler itself on a stub engine that always decodes full segments, so branching, the width
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
from typing import Iterable, Sequence

from ..config import SamplerConfig
from ..engines.base import EngineStats, SegmentOutput, SegmentRequest
from .sampler import RolloutResult, TreeSampler

BOUND_SEEDS = 32


class _FullSegments:
    """An engine that decodes every segment to its full length and never ends a path itself."""

    max_context = 1 << 62
    tokenizer = None

    def __init__(self) -> None:
        self.stats = EngineStats()

    def generate(self, requests: Sequence[SegmentRequest]) -> list[SegmentOutput]:
        return [SegmentOutput([1] * r.max_new_tokens, [0.0] * r.max_new_tokens, [0.0] * r.max_new_tokens, False)
                for r in requests]

    def release(self, group: int) -> None:
        pass

    def decode(self, token_ids) -> str:
        return ""

    def reseed(self, seed: int) -> None:
        pass


def bound_saving_ratio(cfg: SamplerConfig) -> float:
    """Structural decoded-token saving for the config (see the module docstring).

    Turn mode counts as fixed segments of max_turn_tokens, every turn full length and answered by
    the environment (whose tokens are never decoded, so they change neither figure).
    """
    if cfg.mode == "independent":
        return 0.0
    ideal = replace(cfg, answer_policy="none", answer_predicate=None, rep_count=0, segment_mode="fixed",
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
        tree = TreeSampler(replace(ideal, seed=seed), _FullSegments()).rollout([[0]]).trees[0]
        savings.append(1.0 - tree.decoded_tokens / tree.leaf_tokens)
    return sum(savings) / len(savings)


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
        "saving_ratio": round(1.0 - decoded / leaf, 6) if leaf else 0.0,
        "bound_saving_ratio": round(bound_saving_ratio(cfg), 6),
        "trajectories_per_second": round(n_traj / wall, 3) if wall else 0.0,
        "decoded_tokens_per_second": round(decoded / wall, 2) if wall else 0.0,
        "leaf_tokens_per_second": round(leaf / wall, 2) if wall else 0.0,
        "mean_response_tokens": round(leaf / n_traj, 2) if n_traj else 0.0,
        "segments": sum(len(t.nodes) for t in trees) - len(env_nodes),
        "env_turns": len(env_nodes),  # environment replies in the trees (each once, however many leaves share it)
        "env_tokens": sum(len(n) for n in env_nodes),  # appended as context: prefilled, never decoded
        "env_errors": reasons.get("env_error", 0),
        "mean_turns": round(turns / n_traj, 3) if n_traj else 0.0,  # assistant turns per trajectory
        "fallbacks": sum(t.fallbacks for t in trees),
        "finish_reasons": dict(sorted(reasons.items())),
    }
