"""The server engine: the engine protocol over OpenAI-compatible completions servers.

    treepo rollout --engine server --server-url http://127.0.0.1:8000 [http://... ...] --model smollm2

Each `SegmentRequest` becomes one POST /v1/completions with `max_tokens` = the segment length and
a per-node seed, sent through a bounded thread pool (`server_concurrency`) to the servers of a
`ServerPool` (routing, retries with backoff, per-server accounting). `generate` returns every
request's segment exactly once, in request order, or raises: a round is never half delivered.
The engine keeps no KV cache; sharing a tree's prefixes is the server's prefix cache's job, which
is why the context always goes out as the same token ids (never re-tokenised text) where the
server accepts ids.

Two dialects, found at start-up:

- `token_ids` (vLLM, SGLang, llama.cpp's C++ `llama-server`): the prompt is the context's token
  ids; the sampled ids come back in `choices[0].token_ids` (`return_token_ids`), or as `token_id:N`
  strings in the log-probs (vLLM's `return_tokens_as_token_ids`); log-probs in
  `logprobs.token_logprobs`; cached prompt tokens in `usage.prompt_tokens_details.cached_tokens`
  (vLLM `--enable-prompt-tokens-details`, SGLang `--enable-cache-report`).
  llama-server is asked on its own `POST /completion` route instead (`return_tokens`, `n_probs: 1`;
  EOS comes back as the last id, as in the embedded engine; cached prompt tokens in
  `timings.cache_n`): its OpenAI route lists log-probs only for tokens after which the text is
  whole UTF-8, so a token that ends mid-character (a byte piece of an emoji, say) would be missing
  from the ids. The native route returns every sampled id; each id without a log-prob for certain gets it from one more
  request (the same context, the top `RECOVER_TOP` log-probs of that position), and where that
  does not list it (a draw from the far tail) the segment stops before it and the rest is drawn
  again, as below.
- `text` (llama-cpp-python's `llama_cpp.server`, which takes only text prompts and returns no ids):
  the context is sent as its text, and every request checks locally that this text tokenises back
  to exactly the context's ids (a mismatch, possible after an unusual sampled token split, is
  counted in `retokenized_contexts` and warned about once); the sampled ids are read from the
  per-token strings of `logprobs.tokens` (each maps to one vocabulary entry), falling back to
  tokenising the completion text when a string is ambiguous. When neither names a token for
  certain (a byte-fallback piece, say), the segment keeps the tokens before it, which are a sound
  sample of the segment's start, and the rest is drawn again from there with another seed (at most
  `MAX_REDRAWS` times; counted in `unmappable_tokens`): ids are never guessed, and one such token
  never ends a rollout. The re-draw slightly under-samples such tokens (the stored log-probs are of
  the full distribution), a small off-policy effect that `unmappable_tokens` sizes. The EOS token is not returned by this server: a segment that stopped at
  EOS ends before it.

At start-up every server is checked (`server_checks.survey`: the model it serves, its kind, its
tokenizer against the local one) and answers one completion. That probe decodes greedily, so whether
a server passes it does not hang on a random draw
(llama.cpp's numerics, and so its draws at a fixed seed, differ from one processor to another).

Log-probs are the sampled tokens' as the server reports them: llama-cpp-python and vLLM (default
`--logprobs-mode raw_logprobs`) report log_softmax(logits) before temperature, SGLang after it;
all equal the embedded engine's at temperature 1 and for greedy decoding. No server reports the
sampling entropy: `entropies` are NaN (so `--divergence-policy entropy` is refused).
"""

from __future__ import annotations

import logging
import math
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Optional, Sequence

from ..config import EngineConfig
from ..errors import ConfigError, InputError, ServerError
from .base import EngineStats, SegmentOutput, SegmentRequest
from .server_checks import probe_ids, string_table, survey
from .server_pool import HTTPRefused, ServerPool, Unusable, Usage

log = logging.getLogger(__name__)

LOGPROB_SLACK = 1e-3  # a log-prob above this is garbage, not rounding
MAX_REDRAWS = 8  # text dialect: re-draws of a segment's rest after a token whose id is uncertain
FORCE_BIAS = 100.0  # forced_logprobs: a logit bias no other token can beat
RECOVER_TOP = 2048  # llama-server: top log-probs asked for to find a sampled token it gave no log-prob


def check_sampler_config(sampler_cfg) -> None:
    """Sampler settings a server cannot serve, refused before any work."""
    if sampler_cfg.divergence_policy == "entropy":
        raise ConfigError("divergence_policy='entropy' needs sampling entropies, which completions servers do not "
                          "report: use fixed_avg, low_prob or high_prob with --engine server.")


class ServerEngine:
    """`Engine` on one or more completions servers. See `treepo.engines.loading.load_engine`."""

    _native, _path = False, "/v1/completions"  # llama-server: its own /completion route (set at start-up)

    def __init__(self, cfg: EngineConfig, tokenizer, *, seed: int = 0, max_context: int = 2048,
                 backoff: float = 0.5):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.stats = EngineStats()
        self.vocab_size = len(tokenizer)
        self.eos_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self.pool = ServerPool(cfg.server_url, timeout=cfg.server_timeout, retries=cfg.server_retries,
                               routing=cfg.server_routing, concurrency=cfg.server_concurrency, backoff=backoff)
        self.reseed(seed)
        self.on_progress: Optional[Callable[[str], None]] = None  # told of each answered request of a round
        self.retokenized_contexts = 0
        self.unmappable_tokens = 0  # text dialect: sampled tokens whose id the answer did not name for certain
        self.recovered_logprobs = 0  # llama-server: log-probs of tokens ending mid-character, asked for again
        self._lock = threading.Lock()  # engine stats, and the tokenizer (not safe across threads)
        self._strings: Optional[dict[str, int]] = None  # text dialect: token string -> id (-1 = ambiguous)
        self.owned: list = []  # servers this engine started (--launch_server): stopped by close()
        self.model_name, self.dialect, served_context = self._check_servers()
        self.max_context = min(max_context, served_context or max_context)
        self._executor = ThreadPoolExecutor(cfg.server_concurrency, thread_name_prefix="treepo-server")

    # -- protocol ---------------------------------------------------------------------------
    def reseed(self, seed: int) -> None:
        self.seed = seed

    def rng_state(self) -> int:
        return self.seed  # every draw is a function of (seed, group, node): the seed is the whole state

    def set_rng_state(self, state) -> None:
        self.seed = int(state)

    def sync_weights(self) -> None:
        pass  # the weights live on the servers: treepo.engines.weight_sync pushes them

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def release(self, group: int) -> None:
        pass  # nothing cached here: the server's prefix cache evicts on its own

    def generate(self, requests: Sequence[SegmentRequest]) -> list[SegmentOutput]:
        if not requests:
            return []
        self.stats.generate_calls += 1
        bodies = [self._body(r) for r in requests]  # built here: the tokenizer stays on this thread
        futures = [self._executor.submit(self._complete, r, b) for r, b in zip(requests, bodies)]
        outputs: list[SegmentOutput] = []
        for future in futures:
            try:
                outputs.append(future.result())
                if self.on_progress is not None:
                    self.on_progress(f"request {len(outputs)}/{len(futures)}")
            except BaseException:
                for f in futures:
                    f.cancel()
                wait(futures)  # no request still running when the error reaches the caller
                raise
        return outputs

    # -- accounting -------------------------------------------------------------------------
    def server_report(self) -> dict:
        """Per-server accounting and what the numbers mean, for the rollout summary."""
        return {
            "dialect": self.dialect,
            "kind": self.server_kind,
            "model": self.model_name,
            "routing": self.cfg.server_routing,
            "concurrency": self.cfg.server_concurrency,
            "servers": self.pool.report(),
            "retokenized_contexts": self.retokenized_contexts,
            "unmappable_tokens": self.unmappable_tokens,
            "recovered_logprobs": self.recovered_logprobs,
        }

    def forced_logprobs(self, url: str, ids: Sequence[int], start: int) -> list[float]:
        """log p(ids[t] | ids[:t]) for t >= start as the server at `url` computes it (teacher-forced).

        One single-token greedy completion per position, the wanted token forced by a logit bias;
        the server must report log-probs from the raw logits (llama-server, vLLM's default), so
        the bias does not show in them. Token-id servers only (the weight-sync fingerprint).
        """
        if self.dialect != "token_ids":
            raise InputError("checking a server's weights needs a server that takes token ids (llama-server, vLLM, "
                             "SGLang); llama-cpp-python's server takes text only.")
        server = next((s for s in self.pool.servers if s.url == url), None)
        if server is None:
            raise ValueError(f"forced_logprobs: {url} is not one of this engine's servers")
        ids = [int(t) for t in ids]

        def one(t: int) -> float:
            probe = SegmentRequest(0, (0,), (tuple(ids[:t]),), 1)
            bias = [[ids[t], FORCE_BIAS]] if self._native else {str(ids[t]): FORCE_BIAS}
            body = {**self._body(probe, greedy=True), "logit_bias": bias, "ignore_eos": False}
            out, _ = self.pool.post(self._path, body, lambda a: self._parse(a, probe), server=server)
            if out.token_ids[:1] != [ids[t]] and not (self._native and not out.token_ids):
                raise ServerError(f"server {url} did not honour a logit bias (asked for token {ids[t]}, got "
                                  f"{out.token_ids}): its log-probs cannot be checked token by token.")
            if not out.token_ids or math.isnan(out.logprobs[0]):  # llama-server: a token ending mid-character
                found = self._top_logprob(probe, [], ids[t], server) if self._native else None
                return math.nan if found is None else found
            return out.logprobs[0]

        return list(self._executor.map(one, range(start, len(ids))))

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.pool.close()
        for server in self.owned:
            server.stop()

    # -- one request ------------------------------------------------------------------------
    def _seed(self, r: SegmentRequest, redraw: int = 0) -> int:
        """A seed per node (and re-draw), so a node's tokens depend on neither the order of the answers nor retries."""
        key = (self.seed, r.group, r.node_id) if not redraw else (self.seed, r.group, r.node_id, redraw)
        return zlib.crc32(repr(key).encode()) & 0x7FFFFFFF

    def _body(self, r: SegmentRequest, max_tokens: Optional[int] = None, *, redraw: int = 0,
              greedy: bool = False) -> dict:
        cfg, m = self.cfg, max_tokens or r.max_new_tokens
        ids = r.context_ids()
        body = {"model": self.model_name, "max_tokens": m, "temperature": 0.0 if greedy else cfg.temperature,
                "top_p": cfg.top_p, "min_p": 0.0, "seed": self._seed(r, redraw), "stream": False}
        if self._native:  # llama-server's own /completion: the full list of sampled ids (see _align_native)
            body = {"prompt": ids, "n_predict": m, "temperature": body["temperature"], "top_p": cfg.top_p,
                    "min_p": 0.0, "top_k": cfg.top_k, "seed": body["seed"], "n_probs": 1, "return_tokens": True,
                    "cache_prompt": True, "ignore_eos": cfg.ignore_eos, "repeat_penalty": 1.0, "stream": False}
        elif self.dialect == "text":
            text = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if self.tokenizer(text, add_special_tokens=False)["input_ids"] != ids:
                self.retokenized_contexts += 1
                if self.retokenized_contexts == 1:
                    log.warning("the server takes text prompts, and a context's text tokenises to other ids than "
                                "the tree's (counted in retokenized_contexts); a server that takes token ids "
                                "(vLLM, SGLang) never does this")
            body.update(prompt=text, top_k=cfg.top_k, repeat_penalty=1.0, logprobs=0)
            if cfg.ignore_eos:
                body["min_tokens"] = m  # llama-cpp-python has no ignore_eos: EOS is masked until max_tokens
        else:
            body.update(prompt=ids, top_k=cfg.top_k or -1, repetition_penalty=1.0, logprobs=1,
                        return_token_ids=True, return_tokens_as_token_ids=True, ignore_eos=cfg.ignore_eos)
        return body

    def _complete(self, r: SegmentRequest, body: dict) -> SegmentOutput:
        """One segment; where the answer named a token's id uncertainly, the rest is drawn again from there."""
        tokens: list[int] = []
        logprobs: list[float] = []
        request = r
        for redraw in range(MAX_REDRAWS + 1):
            try:
                out, complete = self.pool.post(self._path, body, lambda answer: self._parse(answer, request))
            except HTTPRefused as e:
                raise ServerError(f"{e}. The server refused a completion request; check --server-model and that "
                                  f"prompt + response fit its context.") from None
            if self._native and any(math.isnan(x) for x in out.logprobs):
                out, complete = self._recover_logprobs(request, out, complete)
            tokens += out.token_ids
            logprobs += out.logprobs
            if complete:
                break
            with self._lock:
                self.unmappable_tokens += 1
                if self.unmappable_tokens == 1:
                    log.warning("the server sampled a token whose id (or, from llama-server, whose log-prob) its answer "
                                "does not name for certain; the segment keeps the tokens before it and draws the rest "
                                "again (counted in unmappable_tokens)")
            left = r.max_new_tokens - len(tokens)
            if left <= 0 or redraw == MAX_REDRAWS:
                break  # a shorter segment: the path goes on from it next round
            request = SegmentRequest(r.group, r.node_id, r.context + (tuple(tokens),), left, r.stop)
            with self._lock:  # the tokenizer is not safe across threads
                body = self._body(request, redraw=redraw + 1)
        hit_eos = complete and out.hit_eos
        with self._lock:
            self.stats.decode_tokens += len(tokens)
        return SegmentOutput(tokens, logprobs, [math.nan] * len(tokens), hit_eos)

    def _parse(self, answer: dict, r: SegmentRequest) -> tuple[tuple[SegmentOutput, bool], Usage]:
        """((the segment, whether it is whole), usage); a text-dialect segment may stop short of an uncertain id."""
        if self._native:
            return self._parse_native(answer, r)
        try:
            choice = answer["choices"][0]
            finish = choice["finish_reason"]
            lp = choice.get("logprobs") or {}
            logprobs = [float(x) for x in lp["token_logprobs"]]
            complete = True
            if self.dialect == "text":
                strings = lp["tokens"]
                if len(strings) != len(logprobs):
                    raise Unusable(f"{len(strings)} token strings but {len(logprobs)} log-probs")
                ids = self._ids_from_strings(strings, choice["text"])
                complete = len(ids) == len(strings)  # shorter only where an id is uncertain
                logprobs = logprobs[: len(ids)]
            elif choice.get("token_ids") is not None:
                ids = [int(t) for t in choice["token_ids"]]
            else:
                ids = [int(str(t).removeprefix("token_id:")) for t in lp["tokens"]]
            usage = answer.get("usage") or {}
            prompt_tokens = int(usage.get("prompt_tokens", len(r.context_ids())))
            details = usage.get("prompt_tokens_details") or {}
            cached = details.get("cached_tokens")
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise Unusable(f"no completion with token ids and log-probs ({type(e).__name__}: {e})") from None
        if len(ids) != len(logprobs):
            raise Unusable(f"{len(ids)} token ids but {len(logprobs)} log-probs")
        if not all(0 <= t < self.vocab_size for t in ids):
            raise Unusable(f"token id outside the local vocabulary of {self.vocab_size}")
        if not all(x <= LOGPROB_SLACK and not math.isnan(x) for x in logprobs):
            raise Unusable("log-probs that are not log-probabilities")
        if finish not in ("stop", "length"):
            raise Unusable(f"finish_reason={finish!r}")
        # no stop strings are sent: 'stop' means EOS (of a whole segment only)
        hit_eos = finish == "stop" and not self.cfg.ignore_eos and complete
        out = SegmentOutput(ids, logprobs, [math.nan] * len(ids), hit_eos)
        with self._lock:
            self.stats.prefill_tokens += prompt_tokens - int(cached or 0)
        return (out, complete), Usage(prompt_tokens, len(ids), None if cached is None else int(cached))

    def _parse_native(self, answer: dict, r: SegmentRequest) -> tuple[tuple[SegmentOutput, bool], Usage]:
        """llama-server's /completion answer: (the segment with NaN where a log-prob is missing, True), usage."""
        try:
            ids = [int(t) for t in answer["tokens"]]
            probs = [(int(p["id"]), float(p["logprob"])) for p in answer.get("completion_probabilities") or []]
            stop = answer["stop_type"]
            prompt_tokens = int(answer["tokens_evaluated"])
            cached = int((answer.get("timings") or {}).get("cache_n", 0))
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise Unusable(f"no completion with token ids and log-probs ({type(e).__name__}: {e})") from None
        if stop not in ("eos", "limit"):
            raise Unusable(f"stop_type={stop!r}")
        logprobs, trusted = _align_native(ids, probs)
        if not all(0 <= t < self.vocab_size for t in ids):
            raise Unusable(f"token id outside the local vocabulary of {self.vocab_size}")
        if not all(math.isnan(x) or x <= LOGPROB_SLACK for x in logprobs):
            raise Unusable("log-probs that are not log-probabilities")
        # The ids are all there; where the entries cannot be placed for certain, every log-prob from there on
        # is asked for again (_recover_logprobs) rather than the segment cut, which would favour other draws.
        logprobs[trusted:] = [math.nan] * (len(ids) - trusted)
        hit_eos = stop == "eos" and not self.cfg.ignore_eos
        with self._lock:
            self.stats.prefill_tokens += prompt_tokens - cached
        out = SegmentOutput(ids, logprobs, [math.nan] * len(ids), hit_eos)
        return (out, True), Usage(prompt_tokens, len(ids), cached)

    def _recover_logprobs(self, r: SegmentRequest, out: SegmentOutput, complete: bool) -> tuple[SegmentOutput, bool]:
        """llama-server: fill each NaN log-prob from the top log-probs at its position; (segment, whole).
        Where a token's log-prob cannot be found the segment stops before it (whole = False)."""
        logprobs = list(out.logprobs)
        for i, x in enumerate(logprobs):
            if not math.isnan(x):
                continue
            found = self._top_logprob(r, out.token_ids[:i], out.token_ids[i])
            if found is None:
                return SegmentOutput(out.token_ids[:i], logprobs[:i], [math.nan] * i, False), False
            logprobs[i] = found
        return SegmentOutput(out.token_ids, logprobs, out.entropies, out.hit_eos), complete

    def _top_logprob(self, r: SegmentRequest, before: list[int], token: int, server=None) -> Optional[float]:
        """log p(token | context + before) from llama-server's top log-probs at that position (one request that
        stops at once: EOS forced, whose own entry is always listed), or None when the token is not among them."""
        eos = next(iter(self.eos_ids), None)
        if eos is None:
            return None
        probe = SegmentRequest(r.group, r.node_id, r.context + (tuple(before),), 1)
        body = {**self._body(probe, greedy=True), "n_probs": RECOVER_TOP, "ignore_eos": False,
                "logit_bias": [[eos, FORCE_BIAS]]}

        def parse(answer: dict):
            try:
                top = answer["completion_probabilities"][0]["top_logprobs"]
                return {int(p["id"]): float(p["logprob"]) for p in top}, Usage(0, 0)
            except (KeyError, IndexError, TypeError, ValueError) as e:
                raise Unusable(f"no top log-probs ({type(e).__name__}: {e})") from None

        found = self.pool.post(self._path, body, parse, server=server).get(token)
        if found is not None:
            with self._lock:
                self.recovered_logprobs += 1
        return found

    def _ids_from_strings(self, strings: list, text: str) -> list[int]:
        """Text dialect: the sampled ids from the per-token strings (see the module docstring): all of them,
        or those before the first token whose id neither its string nor the text's tokenisation names."""
        table = self._strings
        ids = [table.get(s, -1) if isinstance(s, str) else -1 for s in strings]
        if all(i >= 0 for i in ids):
            return ids
        with self._lock:
            canonical = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(canonical) == len(ids) and all(a < 0 or a == b for a, b in zip(ids, canonical)):
            return canonical
        return ids[: ids.index(-1)]

    # -- start-up checks --------------------------------------------------------------------
    def _check_servers(self) -> tuple[str, str, Optional[int]]:
        """(model name, dialect, context the servers allow) after checking every server; errors before any rollout."""
        self.model_name, self.dialect, self.server_kind, context = survey(self.pool, self.tokenizer, self.cfg)
        if self.server_kind == "llama.cpp":
            self._native, self._path = True, "/completion"
        if self.dialect == "text":
            self._strings = string_table(self.tokenizer, self.vocab_size)
            if self.cfg.temperature not in (0.0, 1.0):
                log.warning("llama-cpp-python reports log-probs before temperature: at temperature %s they are "
                            "not the sampling distribution's", self.cfg.temperature)
        for server in self.pool.servers:  # one tiny completion each: the endpoint exists and answers with ids
            probe = SegmentRequest(0, (0,), (tuple(probe_ids(self.tokenizer)),), 2)
            try:  # greedy: the check must not depend on a random draw
                out, complete = self.pool.post(self._path, self._body(probe, greedy=True),
                                               lambda a: self._parse(a, probe), server=server)
            except HTTPRefused as e:
                raise InputError(f"server_url={server.url!r} does not answer completions for model "
                                 f"{self.model_name!r}: {e}") from None
            if not complete and not out.token_ids:  # not even the first token's id could be named
                raise InputError(f"server_url={server.url!r}: its answers do not name the sampled tokens' ids for "
                                 f"model {self.model_name!r} (the per-token strings match no vocabulary entry of "
                                 "the local tokenizer): pass --model the model the server runs.")
        self.pool.reset_stats()  # the start-up probes are not rollout work
        self.stats = EngineStats()
        self.retokenized_contexts = self.unmappable_tokens = self.recovered_logprobs = 0
        return self.model_name, self.dialect, context

def _align_native(ids: list[int], probs: list[tuple[int, float]]) -> tuple[list[float], int]:
    """(log-probs, trusted) for llama-server's sampled `ids` from its (id, log-prob) entries.

    llama-server lists no entry for a token after which the text ends mid-character, so `probs` is
    a subsequence of `ids`: NaN where an entry is missing. An entry whose leftmost and rightmost
    possible places differ (the same id skipped nearby, e.g. a 4-byte character split over
    <0xF0> <0x9F> <0x98> <0x9F>) cannot be placed for certain; `trusted` is how many leading ids
    come before the first such entry's leftmost place (all of them when every entry is placed).
    Unusable if the entries are not a subsequence of the ids.
    """
    n, m = len(ids), len(probs)
    left, j = [], 0
    for i, t in enumerate(ids):  # leftmost embedding
        if j < m and probs[j][0] == t:
            left.append(i)
            j += 1
    if j != m:
        raise Unusable(f"{m} log-prob entries do not fit the {n} sampled ids")
    right, j = [0] * m, m - 1
    for i in range(n - 1, -1, -1):  # rightmost embedding
        if j >= 0 and probs[j][0] == ids[i]:
            right[j] = i
            j -= 1
    trusted = next((left[k] for k in range(m) if left[k] != right[k]), n)
    out = [math.nan] * n
    for k, i in enumerate(left):
        out[i] = probs[k][1]
    return out, trusted
