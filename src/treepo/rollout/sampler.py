"""Segment-wise tree sampling (TreePO): grow every prompt's tree in lockstep.

Each round sends every active path of every prompt to the engine in one batched call, then, per
prompt, classifies the new segments (`stopping.classify`) and decides how many children each
surviving path gets. Under the default 'particles' budget (`particles.py`) a path's particles are
split at fork points and a path that ends keeps them, so the weighted leaves are exact draws and the
tree never decodes more than independent sampling; with the adaptive shape (`shape.py`) each rollout's
segment length, root fan-out and fork depth are chosen from the answer lengths of the last rollouts.
The paper's 'transfer' budget (`branching.children_total`, `split_children`) and backtracking from
finished paths (`plan_fallback`) remain as options. The decision functions are pure over explicit
tree data; `TreeSampler` is the loop around them.

With an environment (`treepo.envs`), a model segment that closes its assistant turn (EOS or a
stop string) and does not finish the path gets the environment's reply as an env node, the path's
only child there; the path grows (and forks) below it. Segments are fixed-length, or in turn mode
one assistant turn each; backtracking forks only where the model is the next to speak
(`PromptTree.fork_points`), so in turn mode it cuts at turn boundaries.

    sampler = TreeSampler(SamplerConfig(width=8, depth=4, segment_len=64), engine)
    trees = sampler.rollout([prompt_ids_1, prompt_ids_2]).trees
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from ..config import SamplerConfig
from ..engines.base import Engine, SegmentOutput, SegmentRequest
from ..engines.memory import format_bytes
from ..envs.base import EnvError, Environment, PathView, check_env, load_env, path_view, turn_token_ids
from ..errors import ConfigError, InputError
from ..tree import Node, NodeId, PromptTree
from .branching import children_total, divergence_temperature, path_score, plan_fallback, root_fanout, split_children
from .particles import child_particles, split_particles
from .shape import AdaptiveShape, TreeShape, adaptive_applies, shaped_config
from .stopping import AnswerPredicate, answer_predicate, classify

log = logging.getLogger(__name__)
ENV_ERRORS_LOGGED = 5  # environment errors logged in full per sampler; after that one line per 100

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
    shape: Optional[TreeShape] = None  # the adaptive shape this rollout grew (None: the config's own)


@dataclass
class RolloutPlan:
    """The size of a rollout, told before it starts: prompts x width x response budget, and its KV cache."""

    prompts: int
    width: int
    budget: int  # most response tokens per trajectory
    batch: int  # prompts grown together (one KV cache)
    longest_prompt: int
    kv_bytes: Optional[int] = None  # the batch's KV cache at its largest; None for an engine without one
    available: Optional[int] = None  # memory the engine's device can still give

    @property
    def most_tokens(self) -> int:
        """An upper bound on the response tokens of all trajectories (shared prefixes and early stops make it less)."""
        return self.prompts * self.width * self.budget

    def describe(self) -> str:
        text = (f"{self.prompts} prompts x width {self.width} x budget {self.budget} tokens = at most "
                f"{self.most_tokens:,} response tokens, {self.batch} prompts at a time")
        if self.kv_bytes is not None:
            text += f"; KV cache up to {format_bytes(self.kv_bytes)}"
            if self.available is not None:
                text += f" of {format_bytes(self.available)} available"
        return text


class TreeSampler:
    """Grows TreePO trees (or independent samples) for a batch of prompts through an `Engine`."""

    def __init__(
        self,
        cfg: SamplerConfig,
        engine: Engine,
        *,
        predicate: Optional[AnswerPredicate] = None,
        on_round: Optional[Callable[[RoundInfo], None]] = None,
        env: Optional[Environment] = None,
    ):
        self.base_cfg = cfg  # as given; `cfg` is the one the current (or last) rollout grows
        self.cfg = cfg
        self.shaper = AdaptiveShape(cfg) if adaptive_applies(cfg) else None
        self.engine = engine
        self.predicate = predicate if predicate is not None else answer_predicate(cfg)
        self.on_round = on_round
        self._group: dict[int, int] = {}  # id(tree) -> the engine group of each tree of the current rollout
        if env is not None:
            check_env(env, type(env).__name__)
        self.env = env if env is not None else load_env(cfg.env, cfg.env_args)
        self.stops = tuple(dict.fromkeys([*cfg.stop_strings, *(self.env.stop_strings if self.env else ())]))
        self.env_errors = 0  # over the sampler's life; each rollout's count is its 'env_error' finish reasons
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

    def plan(self, prompt_lengths: Sequence[int], batch_size: int, *, batch_flag: str = "--prompt_batch_size",
             available: Optional[int] = None) -> RolloutPlan:
        """The rollout's size, refused (ConfigError) when its KV cache cannot fit in the device's memory.

        `batch_size` prompts grow together; `batch_flag` is the setting that sets it (named in the fix).
        `available` overrides the engine's free-memory figure (tests).
        """
        cfg = self.cfg
        batch = max(1, min(batch_size, len(prompt_lengths)))
        longest = max(prompt_lengths, default=0)
        plan = RolloutPlan(len(prompt_lengths), cfg.width, cfg.response_budget, batch, longest)
        need = getattr(self.engine, "kv_cache_bytes", None)
        if need is None:  # e.g. a server engine: the server holds the cache
            return plan
        tokens = longest + cfg.response_budget + 1
        plan.kv_bytes = need(batch * cfg.width, tokens)
        if available is None:
            free = getattr(self.engine, "available_memory", None)
            available = free() if free is not None else None
        plan.available = available
        if available is not None and plan.kv_bytes > available:
            device = getattr(self.engine, "device", "the device")
            raise ConfigError(
                f"the KV cache of {batch} prompts x width {cfg.width} x {tokens} tokens (longest prompt {longest} + "
                f"budget {cfg.response_budget}) needs {format_bytes(plan.kv_bytes)}, more than the "
                f"{format_bytes(available)} free on {device}: lower {batch_flag} (now {batch_size}), --width, or "
                "the budget (--depth x --segment_len, --max_response_tokens)."
            )
        return plan

    def rollout(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        first_index: int = 0,
        indices: Optional[Sequence[int]] = None,
        progress: float = 0.0,
        shape: Optional[TreeShape] = None,
    ) -> RolloutResult:
        """`width` trajectories for every prompt (under 'particles': leaves whose multiplicities sum to
        width). `progress` in [0, 1] drives schedules.

        Tree i gets `prompt_index` `indices[i]` (its prompt's place in the caller's pool; may repeat),
        else `first_index + i`; the engine sees each tree of the call as group `first_index + i`.
        `shape` grows that shape instead of the config's (or the adaptive one's); the adaptive shape
        learns from every rollout's answer lengths.
        """
        if not prompts:
            return RolloutResult(trees=[])
        if shape is None and self.shaper is not None:
            shape = self.shaper.next_shape()
        self.cfg = cfg = shaped_config(self.base_cfg, shape) if shape is not None else self.base_cfg
        if indices is not None and len(indices) != len(prompts):
            raise ValueError(f"rollout: {len(indices)} indices for {len(prompts)} prompts")
        trees = [PromptTree(prompt_index=first_index + i if indices is None else int(indices[i]), prompt_ids=list(p))
                 for i, p in enumerate(prompts)]
        self._group = {id(t): first_index + i for i, t in enumerate(trees)}
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
            if self._particles:
                t.particles = {(j,): m for j, m in enumerate(split_particles(cfg.width, t.root_fanout))}
            pending += [self._request(t, (j,)) for j in range(t.root_fanout)]
        by_group = {self._group[id(t)]: t for t in trees}
        done = 0
        rounds = 0
        while pending:
            outputs = self.engine.generate(pending)
            rounds += 1
            fresh: dict[int, list[Node]] = {}
            for req, out in zip(pending, outputs, strict=True):
                tree = by_group[req.group]
                node = self._make_node(tree, req, out, fallback=(req.group, req.node_id) in fallback_ids)
                tree.nodes[node.id] = node
                fresh.setdefault(req.group, []).append(node)
            pending = []
            fallback_ids.clear()
            for group, nodes in fresh.items():
                tree = by_group[group]
                grown, regrown = self._advance(tree, nodes, temperature)
                pending += grown + regrown
                fallback_ids.update((group, r.node_id) for r in regrown)
                if self._complete(tree):
                    done += 1
                    self.engine.release(group)
            if self.on_round:
                self.on_round(
                    RoundInfo(rounds, len(outputs), sum(len(o.token_ids) for o in outputs), done, len(trees))
                )
        after = self.engine.stats.as_dict()
        if self.shaper is not None:
            self.shaper.history.observe(trees)
        return RolloutResult(
            trees=trees,
            rounds=rounds,
            wall_seconds=time.perf_counter() - started,
            engine_stats={k: after[k] - before.get(k, 0) for k in after},
            shape=shape,
        )

    @property
    def _particles(self) -> bool:
        """Whether the trees carry particles: the 'particles' budget, and independent sampling (one each)."""
        return self.cfg.mode == "independent" or self.cfg.budget == "particles"

    def _complete(self, tree: PromptTree) -> bool:
        if self._particles:
            return sum(tree.particles[leaf] for leaf in tree.leaves) == self.cfg.width
        return len(tree.leaves) == self.cfg.width

    # -- per round, per prompt ---------------------------------------------------------------
    def _request(self, tree: PromptTree, node_id: NodeId) -> SegmentRequest:
        parent = node_id[:-1]
        used = sum(len(n) for n in tree.path(parent))
        return SegmentRequest(
            group=self._group[id(tree)],
            node_id=node_id,
            context=tuple(tuple(chunk) for chunk in tree.context(parent)),
            max_new_tokens=min(self.cfg.segment_cap, self.cfg.response_budget - used),
            stop=self.stops,
        )

    def _make_node(self, tree: PromptTree, req: SegmentRequest, out: SegmentOutput, fallback: bool) -> Node:
        # An engine may overshoot a length cap (e.g. a remote server); the cap is the truth.
        n = min(len(out.token_ids), req.max_new_tokens)
        hit_stop = False
        if self.stops:  # and so is the first stop string, whether or not the engine stopped there
            parent = tree.nodes.get(req.parent_id)
            before = parent.token_ids[-16:] if parent is not None and not parent.env else []  # a split stop string
            cut = stop_cut(self.engine.decode, before, out.token_ids[:n], self.stops)
            if cut is not None:
                n, hit_stop = cut, True
        return Node(
            id=req.node_id,
            token_ids=list(out.token_ids[:n]),
            logprobs=list(out.logprobs[:n]),
            entropies=list(out.entropies[:n]),
            text=self.engine.decode(out.token_ids[:n]),
            start=sum(len(chunk) for chunk in req.context[1:]),
            hit_eos=out.hit_eos and n == len(out.token_ids),
            fallback=fallback,
            hit_stop=hit_stop,
        )

    def _advance(self, tree: PromptTree, nodes: list[Node], temperature: float
                 ) -> tuple[list[SegmentRequest], list[SegmentRequest]]:
        """Classify this round's segments of one prompt; return its next requests: (children of the active
        paths, new branches re-grown from earlier points of finished paths)."""
        cfg = self.cfg
        active: list[tuple[NodeId, Node]] = []  # (where the path grows on: the segment or its env turn, the segment)
        finished: list[NodeId] = []
        for node in nodes:
            reason, tip = self._classify(tree, node)
            if reason is None:
                active.append((tip, node))
            else:
                node.finish_reason = reason
                tree.leaves.append(node.id)
                finished.append(node.id)

        if self._particles:  # independent sampling too: one particle per path, never forked
            grown = []
            for tip, node in active:
                m = tree.particles[node.id]
                tree.particles[tip] = m  # an env turn carries its segment's particles
                depth = sum(not n.env for n in tree.path(node.id))
                shares = [m] if cfg.mode == "independent" else child_particles(m, depth, cfg.fork_depth, cfg.branching)
                for j, c in enumerate(shares):
                    tree.particles[tip + (j,)] = c
                    grown.append(self._request(tree, tip + (j,)))
            return grown, []
        remaining = cfg.width - len(tree.leaves)
        if active:
            # 'transfer': the finished paths' forks go to the survivors; 'branch': to new branches cut from
            # the finished paths at earlier points, so the tree's leaves stay as short as the policy's answers.
            transfer = len(finished) if cfg.budget == "transfer" else 0
            total = children_total(len(active), transfer, remaining, cfg.branching)
            scores = [path_score(tree, n, cfg) for _, n in active] if cfg.divergence_policy != "fixed_avg" else [0.0] * len(active)
            counts = split_children(total, scores, cfg, self.rng, temperature)
            grown = [self._request(tree, tip + (j,)) for (tip, _), c in zip(active, counts) for j in range(c)]
            spare = min(remaining - total, cfg.branching * len(finished)) if cfg.budget == "branch" else 0
            if spare <= 0:
                return grown, []
            tree.fallbacks += 1
            cuts = plan_fallback(tree, spare, cfg, self.rng, candidates=finished)
            return grown, [self._request(tree, i) for i in cuts]
        if remaining > 0:
            tree.fallbacks += 1
            return [], [self._request(tree, i) for i in plan_fallback(tree, remaining, cfg, self.rng)]
        return [], []

    def _classify(self, tree: PromptTree, node: Node) -> tuple[Optional[str], NodeId]:
        """(finish reason or None, the node the path grows on from): the segment, or the env turn added after it."""
        cfg = self.cfg
        path = tree.path(node.id)
        turn_ids = tree.model_turn_ids(node.id)[-1]  # the answer rule reads the current assistant turn
        # Decode the turn only when the answer rule will look at it.
        wants_text = self.predicate is not None and (node.ends_turn or cfg.answer_policy == "boxed_as_eos")
        view: list[PathView] = []  # built once, on the first hook call

        def hook(name: str):
            if not view:
                view.append(path_view(tree, node.id, cfg.turn_limit, self.engine.decode))
            try:
                return getattr(self.env, name)(view[0])
            except Exception as e:  # noqa: BLE001 - any failure of user code ends this path, not the run
                raise EnvError(f"{name} raised {type(e).__name__}: {e}") from e

        def check_finished() -> Optional[str]:
            reason = hook("check_finished")
            if reason is not None and (not isinstance(reason, str) or not reason.strip()):
                raise EnvError(f"check_finished returned {reason!r}, not a finish reason (a non-empty str) or None")
            return reason.strip() if reason is not None else None

        try:
            reason = classify(
                cfg,
                segment_text=node.text,
                response_text=self.engine.decode(turn_ids) if wants_text else "",
                hit_eos=node.hit_eos,
                hit_stop=node.hit_stop,
                response_len=node.end,
                depth=sum(not n.env for n in path),
                predicate=self.predicate,
                env_check=check_finished if self.env is not None else None,
            )
            if reason is not None or self.env is None or not node.ends_turn:
                return reason, node.id
            # The model closed its turn and the path goes on: the environment answers.
            if 1 + sum(n.env for n in path) >= cfg.turn_limit:
                return "max_turns", node.id
            turn = hook("next_turn")
            if turn is None:
                return "env_done", node.id
            tokenizer = getattr(self.engine, "tokenizer", None)
            vocab = len(tokenizer) if tokenizer is not None and hasattr(tokenizer, "__len__") else None
            ids = turn_token_ids(turn, tokenizer, node.token_ids[-1] if node.hit_eos else None, vocab)
        except EnvError as e:
            self._env_error(tree, node, str(e))
            return "env_error", node.id
        if node.end + len(ids) >= cfg.response_budget:  # no room left for the model to reply
            return "max_tokens", node.id
        env_node = Node(id=node.id + (0,), token_ids=ids, logprobs=[0.0] * len(ids), entropies=[0.0] * len(ids),
                        text=self.engine.decode(ids), start=node.end, env=True)
        tree.nodes[env_node.id] = env_node
        return None, env_node.id

    def _env_error(self, tree: PromptTree, node: Node, message: str) -> None:
        self.env_errors += 1
        n = self.env_errors
        if n <= ENV_ERRORS_LOGGED:
            log.warning("environment %s.%s; prompt %d, node %s finishes with reason env_error%s",
                        type(self.env).__name__, message, tree.prompt_index, node.id,
                        " (further errors are logged once per 100)" if n == ENV_ERRORS_LOGGED else "")
        elif n % 100 == 0:
            log.warning("environment %s: %d errors so far (paths finished with env_error); latest: %s",
                        type(self.env).__name__, n, message)


def stop_cut(decode: Callable[[Sequence[int]], str], before: Sequence[int], tokens: Sequence[int],
             stops: Sequence[str]) -> Optional[int]:
    """How many of `tokens` to keep so the segment ends with the first stop string, or None if none occurs.

    `before` are the tokens just ahead of the segment (the same turn), so a stop string split across
    segments is found (if they already hold a complete one, they are ignored). The cut is the shortest
    prefix whose text holds a stop string (a binary search over prefix lengths).
    """
    before = list(before)

    def hit(k: int) -> bool:
        text = decode(before + list(tokens[:k]))
        return any(s in text for s in stops)

    if before and hit(0):
        before = []
    if not tokens or not hit(len(tokens)):
        return None
    lo, hi = 1, len(tokens)  # hit(hi) holds, hit(lo - 1) does not
    while lo < hi:
        mid = (lo + hi) // 2
        if hit(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo
