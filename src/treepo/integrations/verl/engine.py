"""treepo's engine protocol over verl's generation servers: the segment interface both server engines share.

`TreeSampler` asks an `Engine` for one segment per request (`SegmentRequest` -> `SegmentOutput`);
`treepo.engines.server.ServerEngine` answers over HTTP completions servers, `VerlEngine` over verl's
`LLMServerClient` (its load balancer and its vLLM / SGLang servers). Each request goes out as the
context's token ids (the prompt, then every ancestor segment: never re-tokenised text) with
`max_tokens` = the segment length, and every request of one tree carries the same request id, which
verl's load balancer keeps on one server (sticky routing) so that its prefix cache holds the tree's
shared prefixes.

The sampler is synchronous and runs in a worker thread; verl's client is a coroutine on the agent loop
worker's event loop. `generate` submits one round's requests to that loop together and blocks the
sampler's thread (never the loop) until all are answered, or raises the first failure with the server
error named: a round is never half delivered. With `treepo.round_timeout` set, a round that takes longer
(a hung server: a dead one fails at once) abandons the tree with an error instead of waiting.
"""

from __future__ import annotations

import asyncio
import math
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Optional, Sequence

from ...engines.base import EngineStats, SegmentOutput, SegmentRequest
from ...errors import ServerError


class VerlEngine:
    """`Engine` for one prompt's tree, over verl's `LLMServerClient` (`server_manager` of an agent loop)."""

    def __init__(self, client: Any, tokenizer: Any, loop: asyncio.AbstractEventLoop, *, request_id: str,
                 sampling_params: dict, max_context: int, eos_ids: Sequence[int] = (), round_timeout: float = 0.0):
        self.client = client
        self.tokenizer = tokenizer
        self.loop = loop
        self.request_id = request_id  # one per tree: sticky routing keeps the tree on one server
        # verl's sampling parameters (temperature, top_p, top_k, ...); log-probs always asked for
        self.sampling_params = {**sampling_params, "logprobs": True}
        self.max_context = max_context
        self.eos_ids = set(eos_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        self.stats = EngineStats()
        self.cached_prompt_tokens = 0  # prompt tokens the server reported from its prefix cache
        self.weight_versions: set = set()  # the servers' global_steps over the tree's requests
        self.seed = 0
        self.round_timeout = round_timeout  # seconds a round may take (0 = no limit)

    # -- protocol ---------------------------------------------------------------------------
    def generate(self, requests: Sequence[SegmentRequest]) -> list[SegmentOutput]:
        if not requests:
            return []
        self.stats.generate_calls += 1
        future: Future = asyncio.run_coroutine_threadsafe(self._round(list(requests)), self.loop)
        try:
            return future.result(timeout=self.round_timeout or None)
        except FutureTimeout:
            future.cancel()  # cancels the round's requests on the loop
            raise ServerError(f"tree {self.request_id}: a round of {len(requests)} segments took over "
                              f"treepo.round_timeout={self.round_timeout:g} s; the server looks hung, the tree is "
                              "abandoned.") from None

    def release(self, group: int) -> None:
        pass  # the server's prefix cache evicts on its own

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def reseed(self, seed: int) -> None:
        self.seed = seed  # verl's servers draw their own tokens; nothing here is random

    def rng_state(self) -> int:
        return self.seed

    def set_rng_state(self, state) -> None:
        self.seed = int(state)

    def sync_weights(self) -> None:
        pass  # verl's trainer pushes weights to its servers between steps

    # -- one round --------------------------------------------------------------------------
    async def _round(self, requests: list[SegmentRequest]) -> list[SegmentOutput]:
        tasks = [asyncio.ensure_future(self._one(r)) for r in requests]
        try:
            return list(await asyncio.gather(*tasks))
        except Exception as e:  # the first failure cancels the rest of the round
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if isinstance(e, ServerError):
                raise
            raise ServerError(f"verl's generation server failed in the middle of tree {self.request_id} "
                              f"({type(e).__name__}: {e}); the tree is abandoned.") from e

    async def _one(self, r: SegmentRequest) -> SegmentOutput:
        ids = r.context_ids()
        params = {**self.sampling_params, "max_tokens": r.max_new_tokens}
        params.pop("max_new_tokens", None)  # SGLang's server reads max_new_tokens before max_tokens
        out = await self.client.generate(request_id=self.request_id, prompt_ids=ids, sampling_params=params)
        return self._segment(out, r, len(ids))

    def _segment(self, out: Any, r: SegmentRequest, prompt_tokens: int) -> SegmentOutput:
        """verl's TokenOutput -> a segment; ServerError for an answer that cannot be one."""
        if getattr(out, "stop_reason", None) in ("aborted", "abort"):  # vLLM's spelling, SGLang's
            raise ServerError(f"tree {self.request_id}: verl aborted a generation request (the rollout was paused "
                              "or its weights updated mid-tree); TreePO needs a tree's segments from one policy.")
        tokens = [int(t) for t in out.token_ids]
        if not tokens:
            raise ServerError(f"tree {self.request_id}: the server returned no tokens for a segment of up to "
                              f"{r.max_new_tokens} (SGLang does on a log-prob mismatch; a context at the server's "
                              "max_model_len does too).")
        if len(tokens) > r.max_new_tokens:
            raise ServerError(f"tree {self.request_id}: the server returned {len(tokens)} tokens for a segment of at "
                              f"most {r.max_new_tokens}; it does not honour max_tokens.")
        logprobs = [float(x) for x in out.log_probs] if out.log_probs is not None else [math.nan] * len(tokens)
        if len(logprobs) != len(tokens):
            raise ServerError(f"tree {self.request_id}: {len(tokens)} token ids but {len(logprobs)} log-probs.")
        extra = getattr(out, "extra_fields", None) or {}
        cached: Optional[int] = extra.get("num_cached_tokens")
        version = extra.get("global_steps")
        # vLLM and SGLang end a response at an EOS id of the model's generation config (returned as its last id) or
        # at max_tokens: a short segment stopped (check_config makes sure max_model_len does not cut one short)
        hit_eos = tokens[-1] in self.eos_ids or len(tokens) < r.max_new_tokens
        self.stats.decode_tokens += len(tokens)
        self.stats.prefill_tokens += prompt_tokens - int(cached or 0)
        self.cached_prompt_tokens += int(cached or 0)
        if version is not None:
            self.weight_versions.add(version)
        return SegmentOutput(tokens, logprobs, [math.nan] * len(tokens), hit_eos)
