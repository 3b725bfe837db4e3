"""The adaptive tree shape: segment length, root fan-out and fork depth chosen from the answers seen.

A particle tree (`particles.py`) never decodes more than independent sampling, but what it saves, and
how many distinct leaves it keeps, depends on where it forks. Paths that stay together share their
tokens (the saving S) until a fork separates them; paths that end before they separate make one
leaf with several particles (fewer distinct trajectories). So forks should land where prefixes are
long: late enough to share much, early enough that few answers end before them.

Both quantities have closed forms under a renewal model of answer lengths. Let S(l) = P(L > l) be
the survival function of the policy's answer length L (capped at the response budget B), estimated
from the multiplicity-weighted leaves of the last rollouts (`LengthHistory`; exact draws, so
unbiased). With segments of s tokens, n_j paths at model depth j when none ends early
(`particles.level_paths`) and segment j covering tokens [(j-1)s, js):

    E[decoded]  = sum_j n_j sum_{l in segment j} S(l)        (a token is decoded on a path iff L > l)
    E[indep.]   = w sum_{l < B} S(l) = w E[L]
    E[distinct] = sum_{j < d} n_j (S((j-1)s) - S(js)) + n_d S((d-1)s)   (a node is a leaf iff its path ends in it)

Both are linear in S, so pooling the lengths of different prompts gives the pooled expectations
exactly. `choose_shape` searches segment lengths (the budget halved down to `min_segment_len`), root
fan-outs (powers of two up to w, and w) and fork depths, and keeps the shape with the largest expected
saving whose expected distinct leaves are at least `min_distinct` x w; among shapes within one point
of that saving it prefers fewer segments (fewer engine rounds), then a wider root (more rows per
decode step). Independent sampling (root fan-out w) always qualifies, so when answers fit in about
one segment the sampler becomes independent sampling instead of paying for forks. With no lengths
seen yet (the first rollout) it samples independently, in one segment.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, replace
from typing import Iterable, Optional, Sequence

import numpy as np

from ..config import SamplerConfig
from ..tree import PromptTree, leaf_weights
from .particles import level_paths

PILOT_PROMPTS = 2  # a one-shot job's first batch when the adaptive shape has seen no answers yet
HISTORY_ROLLOUTS = 4  # the last rollouts whose answer lengths the shape is chosen from
SAVING_TIE = 0.01  # shapes within this of the best expected saving count as equal


@dataclass(frozen=True)
class TreeShape:
    """One rollout's tree: segments, root fan-out and fork depth, with what the length model expects of it."""

    segment_len: int
    depth: int
    root_fanout: int
    fork_depth: int
    expected_saving: Optional[float] = None  # 1 - E[decoded] / E[independent]; None without lengths
    expected_distinct: Optional[float] = None  # distinct leaves per group
    reason: str = ""
    independent: bool = False  # root fan-out = width: independent sampling, run as such

    def as_dict(self) -> dict:
        return asdict(self)


def answer_budget(cfg: SamplerConfig) -> int:
    """The most tokens an answer can have under the config: max_response_tokens, or sooner depth x segment_len
    (fixed segments end a path at depth first). The adaptive shape keeps exactly this budget."""
    return min(cfg.response_budget, cfg.depth * cfg.segment_len)


def expected_cost(survival: np.ndarray, width: int, branching: int, segment_len: int, root_fanout: int,
                  fork_depth: int) -> tuple[float, float]:
    """(expected saving against independent sampling, expected distinct leaves per group) of a shape.

    survival[l] = P(L > l) for l = 0 .. B-1 (B = len(survival), the response budget); see the module docstring.
    """
    budget = len(survival)
    depth = math.ceil(budget / segment_len)
    paths = level_paths(width, root_fanout, branching, fork_depth, depth)
    alive = np.append(survival, 0.0)  # S(B) = 0: every path ends by the budget
    decoded = distinct = 0.0
    for j, n in enumerate(paths, start=1):
        a, b = (j - 1) * segment_len, min(j * segment_len, budget)
        decoded += n * float(survival[a:b].sum())
        reached = 1.0 if j == 1 else alive[a]  # a first segment always exists (even an empty answer is a leaf)
        distinct += n * (reached - (alive[b] if j < depth else 0.0))
    independent = width * float(survival.sum())
    return (1.0 - decoded / independent if independent > 0 else 0.0), float(distinct)


def independent_shape(cfg: SamplerConfig, reason: str) -> TreeShape:
    """Independent sampling: every particle its own path from the root, in the config's own segments."""
    return TreeShape(cfg.segment_len, cfg.depth, cfg.width, 0, None, None, reason, independent=True)


def candidate_segments(budget: int, min_segment_len: int) -> list[int]:
    """The budget, halved while at least `min_segment_len` (the budget itself always)."""
    out, s = [budget], budget
    while s // 2 >= min_segment_len:
        s //= 2
        out.append(s)
    return out


def choose_shape(survival: np.ndarray, cfg: SamplerConfig) -> TreeShape:
    """The shape with the largest expected saving whose expected distinct leaves reach min_distinct x width."""
    w, b = cfg.width, cfg.branching
    need = cfg.min_distinct * w
    # With b = 1 a path never forks, so only independent sampling keeps distinct leaves apart.
    fanouts = sorted({min(2 ** i, w) for i in range(w.bit_length() + 1)} | {w}) if b > 1 else [w]
    found: list[tuple[float, float, int, int, int, int]] = []  # (saving, distinct, segment, depth, fanout, fork)
    for s in candidate_segments(len(survival), cfg.min_segment_len):
        depth = math.ceil(len(survival) / s)
        for k in fanouts:
            forks = range(1, depth) if k < w and depth > 1 else [0]
            for f in forks:
                saving, distinct = expected_cost(survival, w, b, s, k, f)
                if distinct >= need - 1e-9 or k == w:  # independent sampling always qualifies
                    found.append((saving, distinct, s, depth, k, f))
    best = max(x[0] for x in found)
    near = [x for x in found if x[0] >= best - SAVING_TIE]
    saving, distinct, s, depth, k, f = min(near, key=lambda x: (x[3], -x[4], -x[0], x[5]))
    if k == w:
        return replace(independent_shape(cfg, "answers fit in about one segment: independent sampling"),
                       expected_saving=0.0, expected_distinct=float(w))
    return TreeShape(s, depth, k, f, round(saving, 4), round(distinct, 3), "most expected saving")


class LengthHistory:
    """The policy's answer lengths over the last rollouts, as leaf lengths with their weights."""

    def __init__(self, rollouts: int = HISTORY_ROLLOUTS):
        self.rollouts: deque[list[tuple[int, float]]] = deque(maxlen=rollouts)

    def observe(self, trees: Iterable[PromptTree]) -> None:
        """Add one rollout's leaves: each weighs its share of its group (multiplicity / width), so the
        pooled lengths are draws from the policy (`tree.leaf_weights`)."""
        batch = []
        for t in trees:
            weights = leaf_weights(t.leaves, t.multiplicity())
            batch += [(t.model_tokens(leaf), w * t.group_size) for leaf, w in zip(t.leaves, weights)]
        if batch:
            self.rollouts.append(batch)

    def draws(self) -> float:
        """How many policy draws the pooled lengths stand for."""
        return sum(w for batch in self.rollouts for _, w in batch)

    def survival(self, budget: int) -> np.ndarray:
        """S(l) = P(L > l) for l = 0 .. budget-1 from the weighted lengths (lengths capped at the budget)."""
        pairs = [p for batch in self.rollouts for p in batch]
        lengths = np.minimum(np.array([x for x, _ in pairs], dtype=np.int64), budget)
        weights = np.array([w for _, w in pairs], dtype=np.float64)
        ended_at = np.bincount(lengths, weights=weights, minlength=budget + 1)  # mass ending at each length
        return 1.0 - np.cumsum(ended_at)[:budget] / weights.sum()

    def state(self) -> list[list[list[float]]]:
        return [[[x, w] for x, w in batch] for batch in self.rollouts]

    def load(self, state: Sequence[Sequence[Sequence[float]]]) -> None:
        self.rollouts.clear()
        for batch in state:
            self.rollouts.append([(int(x), float(w)) for x, w in batch])


def adaptive_applies(cfg: SamplerConfig) -> bool:
    """Whether the adaptive shape runs for a config: tree mode, fixed segments, no environment."""
    return cfg.shape == "adaptive" and cfg.mode == "tree" and cfg.segment_mode == "fixed" and cfg.env is None


class AdaptiveShape:
    """Chooses each rollout's shape from the lengths of the last ones (`choose_shape`)."""

    def __init__(self, cfg: SamplerConfig):
        self.cfg = cfg
        self.history = LengthHistory()

    def next_shape(self) -> TreeShape:
        if self.history.draws() < 2 * self.cfg.width:
            return independent_shape(self.cfg, "no answer lengths seen yet: independent sampling")
        return choose_shape(self.history.survival(answer_budget(self.cfg)), self.cfg)


def describe_shape(shape: TreeShape) -> str:
    """One line for a log: the shape and what the length model expects of it."""
    if shape.independent:
        return f"independent sampling ({shape.reason})"
    tree = (f"trees of {shape.segment_len}-token segments, root fan-out {shape.root_fanout}, forks from "
            f"depth {shape.fork_depth}")
    return (f"{tree}: expected {shape.expected_saving:.0%} fewer tokens than independent sampling, "
            f"{shape.expected_distinct:.1f} distinct leaves per group")


def batches(count: int, size: int, shaper: Optional[AdaptiveShape]) -> list[tuple[int, int]]:
    """(start, end) of a one-shot job's prompt batches (`treepo rollout`, `eval`): `size` prompts each, but
    while the adaptive shape has no lengths the first batch is a pilot of PILOT_PROMPTS prompts, sampled
    independently, so the rest grow trees chosen from its answers."""
    first = min(size, PILOT_PROMPTS) if shaper is not None and shaper.history.draws() == 0 else size
    edges = [0, *range(first, count, size), count] if count > first else [0, count]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def shaped_config(cfg: SamplerConfig, shape: TreeShape) -> SamplerConfig:
    """The sampler config that grows `shape` with the same response budget, width and stop rules.

    A shape with root fan-out = width is independent sampling, run as such (`mode='independent'`, the
    config's own segments), so it draws exactly what an independent run with the same seed draws."""
    if shape.independent:
        return replace(cfg, mode="independent", shape="fixed")
    return replace(cfg, shape="fixed", segment_len=shape.segment_len, depth=shape.depth,
                   init_divergence=shape.root_fanout, init_divergence_max=0, fork_depth=shape.fork_depth,
                   max_response_tokens=answer_budget(cfg), max_turns=min(cfg.max_turns, shape.depth))
