"""Segment-wise tree sampling (spec section 2): grow every prompt's tree in lockstep.

Each round sends every active path of every prompt to the engine in one batched call, then, per
prompt, classifies the new segments (`stopping.classify`), decides how many children each
surviving path gets (`children_total`, `split_children`), and backtracks from finished paths when
a prompt has no active path left but fewer than `width` trajectories (`plan_fallback`). The
decision functions are pure over explicit tree data; `TreeSampler` is the loop around them.

    sampler = TreeSampler(SamplerConfig(width=8, depth=4, segment_len=64), engine)
    trees = sampler.rollout([prompt_ids_1, prompt_ids_2]).trees
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from .config import SamplerConfig
from .errors import InputError
from .engines.base import Engine, SegmentOutput, SegmentRequest
from .stopping import AnswerPredicate, answer_predicate, classify
from .tree import ROOT, Node, NodeId, PromptTree

# ---------------------------------------------------------------------------------------------
# Pure decisions
# ---------------------------------------------------------------------------------------------


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


def plan_fallback(
    tree: PromptTree, need: int, cfg: SamplerConfig, rng: random.Random
) -> list[NodeId]:
    """New node ids that regrow `need` paths from segment-aligned cuts of finished paths.

    Candidates (by `fallback_policy`) are shuffled and visited in turn; each visit cuts the path
    at a random segment boundary (drop the last j >= 1 segments) and forks up to `branching`
    children there. With no candidates the paths restart from the prompt. New ids keep the kept
    prefix's ids, so they join the same advantage subgroups, and never reuse an existing index.
    """
    if cfg.fallback_policy == "root":
        candidates: list[NodeId] = []
    elif cfg.fallback_policy == "any":
        candidates = list(tree.leaves)
    else:
        candidates = [leaf for leaf in tree.leaves if tree.nodes[leaf].finish_reason in ("answer", "eos")]
    rng.shuffle(candidates)

    planned: list[NodeId] = []
    next_index: dict[NodeId, int] = {}
    visit = 0
    while len(planned) < need:
        if candidates:
            leaf = candidates[visit % len(candidates)]
            visit += 1
            limit = min(len(leaf), cfg.fallback_max_backtrack or len(leaf))
            cut = rng.randint(1, limit)
            fork_at = leaf[: len(leaf) - cut]
        else:
            fork_at = ROOT
        start = next_index.get(fork_at, tree.next_child_index(fork_at))
        count = min(cfg.branching, need - len(planned))
        planned += [fork_at + (start + k,) for k in range(count)]
        next_index[fork_at] = start + count
    return planned


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@dataclass
class RoundInfo:
    """Progress of one engine round, for progress bars."""

    round: int
    requests: int
    new_tokens: int
    trees_done: int
    trees_total: int


@dataclass
class RolloutResult:
    trees: list[PromptTree]
    rounds: int = 0  # batched engine calls (engine steps)
    wall_seconds: float = 0.0
    engine_stats: dict = field(default_factory=dict)  # the engine's counters for this rollout


class TreeSampler:
    """Grows TreePO trees (or independent samples) for a batch of prompts through an `Engine`."""

    def __init__(
        self,
        cfg: SamplerConfig,
        engine: Engine,
        *,
        predicate: Optional[AnswerPredicate] = None,
        on_round: Optional[Callable[[RoundInfo], None]] = None,
    ):
        self.cfg = cfg
        self.engine = engine
        self.predicate = predicate if predicate is not None else answer_predicate(cfg)
        self.on_round = on_round
        self.rng = random.Random(cfg.seed)
        engine.reseed(cfg.seed)

    def check_fits(self, prompt_ids: Sequence[int], index: int) -> None:
        need = len(prompt_ids) + self.cfg.response_budget
        if need > self.engine.max_context:
            raise InputError(
                f"prompt {index} has {len(prompt_ids)} tokens; with a response budget of "
                f"{self.cfg.response_budget} (depth x segment_len) it needs {need} > the model context "
                f"{self.engine.max_context}: shorten the prompt or lower depth / segment_len / max_response_tokens."
            )

    def rollout(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        first_index: int = 0,
        progress: float = 0.0,
    ) -> RolloutResult:
        """Exactly `width` trajectories for every prompt. `progress` in [0, 1] drives schedules."""
        cfg = self.cfg
        if not prompts:
            return RolloutResult(trees=[])
        trees = [PromptTree(prompt_index=first_index + i, prompt_ids=list(p)) for i, p in enumerate(prompts)]
        for t in trees:
            if not t.prompt_ids:
                raise InputError(f"prompt {t.prompt_index} is empty: give at least one token.")
            self.check_fits(t.prompt_ids, t.prompt_index)
        temperature = divergence_temperature(cfg, progress)
        before = dict(self.engine.stats.as_dict())
        started = time.perf_counter()

        pending: list[SegmentRequest] = []
        fallback_ids: set[tuple[int, NodeId]] = set()
        for t in trees:
            t.root_fanout = root_fanout(cfg, self.rng)
            pending += [self._request(t, (j,)) for j in range(t.root_fanout)]
        by_group = {t.prompt_index: t for t in trees}
        done = 0
        rounds = 0
        while pending:
            outputs = self.engine.generate(pending)
            rounds += 1
            fresh: dict[int, list[Node]] = {}
            for req, out in zip(pending, outputs, strict=True):
                tree = by_group[req.group]
                node = self._make_node(req, out, fallback=(req.group, req.node_id) in fallback_ids)
                tree.nodes[node.id] = node
                fresh.setdefault(req.group, []).append(node)
            pending = []
            fallback_ids.clear()
            for group, nodes in fresh.items():
                tree = by_group[group]
                new_requests, is_fallback = self._advance(tree, nodes, temperature)
                pending += new_requests
                if is_fallback:
                    fallback_ids.update((group, r.node_id) for r in new_requests)
                if len(tree.leaves) == cfg.width:
                    done += 1
                    self.engine.release(group)
            if self.on_round:
                self.on_round(
                    RoundInfo(rounds, len(outputs), sum(len(o.token_ids) for o in outputs), done, len(trees))
                )
        after = self.engine.stats.as_dict()
        return RolloutResult(
            trees=trees,
            rounds=rounds,
            wall_seconds=time.perf_counter() - started,
            engine_stats={k: after[k] - before.get(k, 0) for k in after},
        )

    # -- per round, per prompt ---------------------------------------------------------------
    def _request(self, tree: PromptTree, node_id: NodeId) -> SegmentRequest:
        parent = node_id[:-1]
        used = sum(len(n) for n in tree.path(parent))
        return SegmentRequest(
            group=tree.prompt_index,
            node_id=node_id,
            context=tuple(tuple(chunk) for chunk in tree.context(parent)),
            max_new_tokens=min(self.cfg.segment_len, self.cfg.response_budget - used),
        )

    def _make_node(self, req: SegmentRequest, out: SegmentOutput, fallback: bool) -> Node:
        # An engine may overshoot a length cap (e.g. a remote server); the cap is the truth.
        n = min(len(out.token_ids), req.max_new_tokens)
        return Node(
            id=req.node_id,
            token_ids=list(out.token_ids[:n]),
            logprobs=list(out.logprobs[:n]),
            entropies=list(out.entropies[:n]),
            text=self.engine.decode(out.token_ids[:n]),
            start=sum(len(chunk) for chunk in req.context[1:]),
            hit_eos=out.hit_eos and n == len(out.token_ids),
            fallback=fallback,
        )

    def _advance(self, tree: PromptTree, nodes: list[Node], temperature: float) -> tuple[list[SegmentRequest], bool]:
        """Classify this round's segments of one prompt; return its next requests (and if they are a fallback)."""
        cfg = self.cfg
        active: list[Node] = []
        finished_now = 0
        for node in nodes:
            response = tree.response_ids(node.id)
            # Decode the whole response only when the answer rule will look at it.
            wants_text = self.predicate is not None and (node.hit_eos or cfg.answer_policy == "boxed_as_eos")
            reason = classify(
                cfg,
                segment_text=node.text,
                response_text=self.engine.decode(response) if wants_text else "",
                hit_eos=node.hit_eos,
                response_len=len(response),
                depth=node.depth,
                predicate=self.predicate,
            )
            if reason is None:
                active.append(node)
            else:
                node.finish_reason = reason
                tree.leaves.append(node.id)
                finished_now += 1

        if cfg.mode == "independent":  # every sample runs its own course: no forks, no backtracking
            return [self._request(tree, n.id + (0,)) for n in active], False
        remaining = cfg.width - len(tree.leaves)
        if active:
            total = children_total(len(active), finished_now, remaining, cfg.branching)
            scores = [path_score(tree, n, cfg) for n in active] if cfg.divergence_policy != "fixed_avg" else [0.0] * len(active)
            counts = split_children(total, scores, cfg, self.rng, temperature)
            return [self._request(tree, n.id + (j,)) for n, c in zip(active, counts) for j in range(c)], False
        if remaining > 0:
            tree.fallbacks += 1
            return [self._request(tree, i) for i in plan_fallback(tree, remaining, cfg, self.rng)], True
        return [], False
