"""Where a tree forks and how many children each path gets: the sampler's pure decisions.

- `root_fanout`: the initial divergence, fixed `branching` or drawn from [init_divergence, init_divergence_max];
- `children_total`: children this round, `max(A, min(remaining, b*A + b*F))` (budget transfer: a
  finished path's forks go to the survivors);
- `split_children`: that total split over the active paths, evenly or by a softmax of path scores;
- `plan_fallback`: new branches cut from finished paths at segment boundaries when a prompt has no
  active path left but fewer than `width` trajectories.

All are functions of explicit tree data, a config and a random stream, tested without a model.
"""

from __future__ import annotations

import math
import random
from typing import Optional, Sequence

from ..config import SamplerConfig
from ..tree import ROOT, Node, NodeId, PromptTree


def root_fanout(cfg: SamplerConfig, rng: random.Random) -> int:
    """Initial divergence: fixed, or uniform in [lo, hi] per prompt."""
    lo, hi = cfg.root_fanout_range
    return lo if lo == hi else rng.randint(lo, hi)


def children_total(active: int, finished_now: int, remaining: int, branching: int) -> int:
    """Children this round: max(A, min(remaining, b*A + b*F)).

    The b*F term is budget transfer: the forks finished paths would have had go to the survivors.
    `remaining` = width - trajectories finished so far, so active + finished never exceeds width.
    """
    return max(active, min(remaining, branching * active + branching * finished_now))


def largest_remainder(n: int, weights: Sequence[float]) -> list[int]:
    """Split integer n in proportion to weights (Hamilton's method); ties go to the earlier index."""
    total = sum(weights)
    quotas = [n * w / total for w in weights]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def divergence_temperature(cfg: SamplerConfig, progress: float) -> float:
    """Softmax temperature at training progress in [0, 1]: constant, or cosine from start to end."""
    if cfg.divergence_temperature_end is None:
        return cfg.divergence_temperature
    p = min(max(progress, 0.0), 1.0)
    start, end = cfg.divergence_temperature, cfg.divergence_temperature_end
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def path_score(tree: PromptTree, node: Node, cfg: SamplerConfig) -> float:
    """What the probability / entropy policies rank a path by (higher = more children)."""
    if cfg.divergence_policy == "entropy":
        return _mean(node.entropies)
    if cfg.divergence_score == "last_mean":
        lp = _mean(node.logprobs)
    else:
        all_lp = [x for n in tree.path(node.id) for x in n.logprobs]
        lp = _mean(all_lp) if cfg.divergence_score == "path_mean" else sum(all_lp)
    return -lp if cfg.divergence_policy == "low_prob" else lp


def split_children(
    total: int, scores: Sequence[float], cfg: SamplerConfig, rng: random.Random, temperature: float
) -> list[int]:
    """Children per active path: at least one each (one child = the path just continues), summing to total."""
    n = len(scores)
    assert total >= n >= 1, (total, n)
    if cfg.divergence_policy == "fixed_avg":
        base, rem = divmod(total, n)
        counts = [base] * n
        for i in rng.sample(range(n), rem):
            counts[i] += 1
        return counts
    top = max(scores)
    weights = [math.exp((s - top) / temperature) for s in scores]  # softmax, shifted for stability
    return [1 + extra for extra in largest_remainder(total - n, weights)]


CLEAN_ENDS = ("answer", "eos", "stop", "env_done")  # what fallback_policy='finished' reopens


def plan_fallback(
    tree: PromptTree, need: int, cfg: SamplerConfig, rng: random.Random, candidates: Optional[list[NodeId]] = None
) -> list[NodeId]:
    """New node ids that regrow `need` paths from segment-aligned cuts of finished paths.

    Candidates (by `fallback_policy`) are shuffled and visited in turn; each visit cuts the path
    at a random fork point (`PromptTree.fork_points`: every segment boundary, or with an
    environment only where the model speaks next; go back j >= 1 of them) and forks up to
    `branching` children there. With no candidates the paths restart from the prompt. New ids
    keep the kept prefix's ids, so they join the same advantage subgroups, and never reuse an
    existing index. `candidates` (e.g. the paths that just finished, for the 'branch' budget) replaces
    the policy's choice; the root is then used only when the list is empty.
    """
    if candidates is not None:
        candidates = list(candidates)
    elif cfg.fallback_policy == "root":
        candidates: list[NodeId] = []
    elif cfg.fallback_policy == "any":
        candidates = list(tree.leaves)
    else:
        candidates = [leaf for leaf in tree.leaves if tree.nodes[leaf].finish_reason in CLEAN_ENDS]
    rng.shuffle(candidates)

    planned: list[NodeId] = []
    next_index: dict[NodeId, int] = {}
    visit = 0
    while len(planned) < need:
        if candidates:
            leaf = candidates[visit % len(candidates)]
            visit += 1
            points = tree.fork_points(leaf)  # root side first; without env turns: leaf[:0] .. leaf[:-1]
            limit = min(len(points), cfg.fallback_max_backtrack or len(points))
            cut = rng.randint(1, limit)
            fork_at = points[-cut]
        else:
            fork_at = ROOT
        start = next_index.get(fork_at, tree.next_child_index(fork_at))
        count = min(cfg.branching, need - len(planned))
        planned += [fork_at + (start + k,) for k in range(count)]
        next_index[fork_at] = start + count
    return planned
