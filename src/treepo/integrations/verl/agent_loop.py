"""The tree AgentLoop: a prompt's `n` verl sessions share one TreePO tree (`default_agent_loop=treepo_tree`).

verl's v1 agent loop worker (`AgentLoopWorkerTQ._run_prompt`) starts the `n` sessions of a prompt
together, each with the prompt's `uid` and its `session_id`. Here the first session to arrive opens
the prompt's group, every session joins it before its first await, and on the event loop's next turn
the group, now whole, grows one tree of width = its sessions with treepo's `TreeSampler` on a
`VerlEngine` (verl's server client). Session `i` returns row `i` of the tree (`tree_rows`): leaf
tokens, log-probs and the tree metadata in `extra_fields`. If the tree fails (a server died, verl
aborted a request), every session of the prompt raises the same error, naming it; none waits forever.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopMetrics, AgentLoopOutput, register

from ...errors import ConfigError, TreepoError
from ...rollout.sampler import TreeSampler
from ..rows import completions
from .engine import VerlEngine
from .settings import AGENT_LOOP, TreeSettings, check_config, get, validation_sampler
from .shapes import step_shape
from .tree_rows import leaf_fields

log = logging.getLogger(__name__)
TREE_THREADS = 256  # trees grown at once per agent loop worker (each thread mostly waits for its server)
_executor: Optional[ThreadPoolExecutor] = None


@dataclasses.dataclass
class _Group:
    """One prompt's sessions, and the rows of its tree once grown."""

    rows: asyncio.Future
    sessions: int = 0
    collected: int = 0
    started: bool = False  # the tree is growing: a session joining now would not get a row of it
    task: Optional[asyncio.Future] = None


_groups: dict[str, _Group] = {}  # prompt uid -> its group, while its sessions are running


def _threads() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(TREE_THREADS, thread_name_prefix="treepo-tree")
    return _executor


def _eos_ids(config, tokenizer) -> tuple[int, ...]:
    """Every id the servers stop at: the tokenizer's EOS and the model's generation config's (Qwen2.5 has two)."""
    path = str(get(config, "actor_rollout_ref.model.path", ""))
    if path not in _EOS:
        ids = {tokenizer.eos_token_id} - {None}
        try:
            from transformers import GenerationConfig

            found = GenerationConfig.from_pretrained(path).eos_token_id
            ids |= set(found if isinstance(found, (list, tuple)) else [found]) - {None}
        except Exception:  # no generation config: the tokenizer's EOS (and a short segment) mark the end
            pass
        _EOS[path] = tuple(sorted(int(i) for i in ids))
    return _EOS[path]


_EOS: dict[str, tuple[int, ...]] = {}


@register(AGENT_LOOP)
class TreeAgentLoop(AgentLoopBase):
    """verl AgentLoop whose `n` sessions per prompt return the `n` rows of one TreePO tree."""

    _settings: dict[int, TreeSettings] = {}  # per config object: checked once per worker, not per session

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        key = id(self.config)
        if key not in self._settings:
            self._settings[key] = check_config(self.config, where=f"the {AGENT_LOOP} agent loop")
        self.settings = self._settings[key]

    async def run(self, sampling_params: dict[str, Any], **kwargs) -> AgentLoopOutput:
        uid, session = kwargs.get("uid"), kwargs.get("session_id")
        if uid is None or session is None:
            raise ConfigError(f"the {AGENT_LOOP} agent loop got no uid/session_id: it runs under verl's v1 trainer "
                              "only; set trainer.use_v1=True trainer.v1.trainer_mode=treepo.")
        uid = str(uid)
        group = _groups.get(uid)
        if group is None:  # the first session: the group is grown once all have joined (next loop turn)
            group = _groups[uid] = _Group(self.loop.create_future())
            self.loop.call_soon(self._start, uid, group, sampling_params, kwargs)
        elif group.started:
            raise TreepoError(f"prompt {uid}: a session joined after its tree had started growing (a reused uid, or "
                              f"sessions not started together as verl's AgentLoopWorkerTQ does); {AGENT_LOOP} cannot "
                              "give it a row.")
        group.sessions += 1  # (before any await: every session of the prompt joins in the same loop turn)
        try:
            rows = await asyncio.shield(group.rows)
        finally:
            group.collected += 1
            if group.collected == group.sessions and _groups.get(uid) is group:
                del _groups[uid]
        return rows[int(session)]

    def _start(self, uid: str, group: _Group, sampling_params: dict, kwargs: dict) -> None:
        group.started = True
        group.task = asyncio.ensure_future(self._grow(uid, group, sampling_params, kwargs))

    async def _grow(self, uid: str, group: _Group, sampling_params: dict, kwargs: dict) -> None:
        try:
            group.rows.set_result(await self._tree_rows(uid, group.sessions, sampling_params, kwargs))
        except BaseException as e:  # every session gets the error: none waits for rows that never come
            if not isinstance(e, TreepoError):
                e = TreepoError(f"treepo tree for prompt {uid} failed: {type(e).__name__}: {e}")
            group.rows.set_exception(e)

    async def _tree_rows(self, uid: str, width: int, sampling_params: dict, kwargs: dict) -> list[AgentLoopOutput]:
        rollout = self.rollout_config
        expected = {int(get(rollout, "n", 1)), int(get(rollout, "val_kwargs.n", 1))}
        if width not in expected:
            raise ConfigError(f"prompt {uid}: {width} sessions joined its tree but rollout.n / val_kwargs.n are "
                              f"{sorted(expected)}; per-prompt n (__rollout_n__) is not supported by {AGENT_LOOP}.")
        prompt_ids = await self.ct_build_initial_tokens(list(kwargs["raw_prompt"]))
        seed = zlib.crc32(uid.encode()) & 0x7FFFFFFF
        if width == self.settings.sampler.width:
            cfg = dataclasses.replace(self.settings.sampler, seed=seed)
        else:  # a validation pass of another width (val_kwargs.n): independent draws
            cfg = dataclasses.replace(validation_sampler(self.settings.sampler, width), seed=seed)
        kind = (width, *(str(sampling_params.get(k)) for k in ("temperature", "top_p", "top_k")))
        step = kwargs.get("global_steps")
        shape, shapes = step_shape(cfg, kind, step)
        engine = VerlEngine(self.server_manager, self.tokenizer, self.loop, request_id=f"treepo-{uid}",
                            sampling_params=sampling_params,
                            max_context=int(rollout.prompt_length) + int(rollout.response_length),
                            eos_ids=_eos_ids(self.config, self.tokenizer), round_timeout=self.settings.round_timeout)
        started = time.perf_counter()
        sampler = TreeSampler(dataclasses.replace(cfg, shape="fixed"), engine)  # the step's shape, or the fixed one
        result = await self.loop.run_in_executor(_threads(), lambda: sampler.rollout([prompt_ids], shape=shape))
        seconds = time.perf_counter() - started
        tree = result.trees[0]
        if shapes is not None:
            shapes.finished(step, tree)
        ids, logps = completions([tree])
        if len(ids) != width:
            raise TreepoError(f"prompt {uid}: the tree gave {len(ids)} rows for {width} sessions.")
        versions = sorted(engine.weight_versions) or [None]
        shared = {"treepo_tree_decoded_tokens": tree.decoded_tokens,  # unique tokens the servers sampled
                  "treepo_tree_particle_tokens": tree.particle_tokens,  # n independent draws of these answers
                  "treepo_tree_distinct_leaves": len(tree.leaves),
                  "treepo_tree_cached_prompt_tokens": engine.cached_prompt_tokens,
                  "treepo_tree_requests": engine.stats.generate_calls,
                  "treepo_tree_segment_len": (shape.segment_len if shape else cfg.segment_len),
                  "treepo_tree_root_fanout": (shape.root_fanout if shape else tree.root_fanout),
                  "min_global_steps": versions[0], "max_global_steps": versions[-1],
                  "turn_scores": [], "tool_rewards": []}
        want_logprobs = bool(sampling_params.get("logprobs"))
        return [
            AgentLoopOutput(prompt_ids=list(prompt_ids), response_ids=row, response_mask=[1] * len(row),
                            response_logprobs=list(lp) if want_logprobs else None, num_turns=2,
                            metrics=AgentLoopMetrics(generate_sequences=seconds),
                            extra_fields={**fields, **shared})
            for row, lp, fields in zip(ids, logps, leaf_fields(tree))
        ]
