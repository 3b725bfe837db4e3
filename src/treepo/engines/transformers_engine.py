"""The embedded engine: batched segment decoding on a transformers causal LM with a forked KV cache.

State between calls:
- the *front*: the rows decoded in the last call (one per request that did not stop at EOS),
  each a KV row plus its pending token (sampled, not yet run through the model);
- the *roots*: per prompt, the KV of the prompt minus its last token, which is pending.

A request whose parent is in the front starts from a copy of the parent's row (children of one
parent are repeated rows: prefix shared, nothing re-prefilled). Any other request starts from its
prompt's root, and a fallback branch from a staged row holding its kept prefix, prefilled once
per fork point however many siblings grow there; so the prompt is prefilled once per rollout.
Rows that stop early stay in the batch (their cache no longer advancing) until a quarter of the
batch has stopped, then the batch is compacted; on CUDA that check runs every 4 steps to limit
host syncs. The front keeps only rows that ran every step of the call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..config import EngineConfig
from ..errors import ConfigError, InputError
from .backends import HFDecoder, LeanDecoder, lean_unsupported_reason
from .base import EngineStats, SegmentOutput, SegmentRequest
from .kvcache import RowCache, cache_argument
from .memory import available_memory, kv_cache_bytes
from .sampling import sample_tokens

log = logging.getLogger(__name__)

PREFILL_TOKENS_PER_CALL = 2048  # rows x padded length of one prefill forward (bounds memory and padding)


@dataclass
class _Rows:
    """Cached rows and the token each row will feed next."""

    cache: RowCache
    pending: torch.Tensor  # [B] int64
    index: dict  # key -> row
    lengths: list[int]  # cache.lens on the host: positions cached per row


def eos_token_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for source in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        getattr(model.config, "eos_token_id", None),
    ):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(x) for x in source)
    return frozenset(ids)


def context_length(config) -> int:
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def kv_shape(model) -> tuple[int, int, int]:
    """(layers, kv heads, head dim), read from one real forward so any architecture reports its own."""
    from transformers import DynamicCache

    probe = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=model.device), **{cache_argument(model): probe},
              use_cache=True)
    shapes = {tuple(layer.keys.shape[1:2]) + tuple(layer.keys.shape[3:]) for layer in probe.layers}
    kinds = {type(layer).__name__ for layer in probe.layers}
    if len(shapes) != 1 or kinds != {"DynamicLayer"}:
        raise InputError(
            f"{model.config.model_type}: layers with different cache shapes or kinds ({sorted(kinds)}) "
            "are not supported by the embedded engine; use a model with uniform full attention."
        )
    (heads, dim), = shapes
    return len(probe.layers), heads, dim


def choose_decoder(model, backend: str, shape: tuple[int, int, int]):
    """The lean decoder where it applies and reproduces the model's own logits, else the HF forward.

    `shape` is the model's (layers, kv heads, head dim), from `kv_shape`.
    """
    if backend == "hf":
        return HFDecoder(model)
    reason = lean_unsupported_reason(model)
    if reason:
        if backend == "lean":
            raise ConfigError(f"backend='lean' cannot run this model: {reason}. Use backend='hf' or 'auto'.")
        log.info("lean decoder not used (%s); using the model's own forward", reason)
        return HFDecoder(model)
    lean = LeanDecoder(model)
    if backend == "auto":
        vocab = model.config.vocab_size
        tokens = (torch.arange(1, 10, device=model.device) * 7919 % vocab)[None]  # [1, 9]
        with torch.inference_mode():
            ref = model(input_ids=tokens).logits[0, -1].float()
        cache = RowCache.empty(shape, 1, tokens.shape[1], model.dtype, model.device)
        lean.forward(tokens[:, :-1], cache, want_logits=False)
        cache.lens += tokens.shape[1] - 1
        got = lean.forward(tokens[:, -1:], cache, want_logits=True)[0]
        tol = (1e-3 if model.dtype == torch.float32 else 5e-2) * max(1.0, float(ref.abs().max()))
        if float((got - ref).abs().max()) > tol:
            log.warning("lean decoder disagrees with the model's forward; using the model's own forward")
            return HFDecoder(model)
    return lean


class TransformersEngine:
    """`Engine` on a loaded transformers model and tokenizer. See `treepo.engines.loading.load_engine`."""

    def __init__(self, model, tokenizer, cfg: Optional[EngineConfig] = None, *, seed: int = 0):
        self.cfg = cfg or EngineConfig()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = model.device
        self.stats = EngineStats()
        self.eos_ids = eos_token_ids(model, tokenizer)
        if not self.eos_ids and not self.cfg.ignore_eos:
            raise InputError("the model and tokenizer define no EOS token: set one, or run with ignore_eos.")
        self.max_context = context_length(model.config)
        self.shape = kv_shape(model)
        self.decoder = choose_decoder(model, self.cfg.backend, self.shape)
        self.generator = torch.Generator(device=self.device)
        self.reseed(seed)
        self._eos = torch.tensor(sorted(self.eos_ids), dtype=torch.long, device=self.device)
        self._front: Optional[_Rows] = None
        self._roots: dict[int, tuple[tuple[int, ...], _Rows]] = {}
        self._check_every = 1 if self.device.type == "cpu" else 4  # host syncs for stop checks
        # Called during a generate call with a short progress text ("token 12/64, 256 paths"), for progress bars.
        self.on_progress: Optional[Callable[[str], None]] = None

    # -- memory -----------------------------------------------------------------------------
    def kv_cache_bytes(self, rows: int, tokens: int) -> int:
        """Bytes of the KV cache of `rows` paths of `tokens` positions each, in the model's dtype."""
        layers, heads, dim = self.shape
        return kv_cache_bytes(rows, tokens, layers, heads, dim, torch.tensor([], dtype=self.model.dtype).element_size())

    def available_memory(self) -> Optional[int]:
        """Bytes the engine's device can still allocate (None: unknown)."""
        return available_memory(self.device)

    # -- protocol ---------------------------------------------------------------------------
    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def rng_state(self):
        return self.generator.get_state()

    def set_rng_state(self, state) -> None:
        self.generator.set_state(state)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def release(self, group: int) -> None:
        self._roots.pop(group, None)

    def sync_weights(self) -> None:
        """Call after the model's weights change (e.g. an optimizer step): re-reads them and drops cached KV."""
        refresh = getattr(self.decoder, "refresh", None)
        if refresh is not None:
            refresh()
        self._front = None
        self._roots.clear()

    def generate(self, requests: Sequence[SegmentRequest]) -> list[SegmentOutput]:
        if not requests:
            return []
        self.stats.generate_calls += 1
        groups = {r.group for r in requests}
        for g in [g for g in self._roots if g not in groups]:  # a prompt with no request this round is done
            del self._roots[g]

        # 1. Where each request's state comes from, and one batch with rows from the same source adjacent.
        sources = self._sources(requests)
        rank: dict[int, int] = {}
        for src, _ in sources:
            rank.setdefault(id(src), len(rank))
        keys = [(rank[id(src)], row) for src, row in sources]
        order = sorted(range(len(requests)), key=keys.__getitem__)
        parts = [sources[i] for i in order]
        m = [requests[i].max_new_tokens for i in order]
        cap = max(src.lengths[row] + k for (src, row), k in zip(parts, m)) + 1
        pending = torch.stack([src.pending[row] for src, row in parts])  # [B]
        cache = RowCache.gather(_runs(parts), cap)
        del parts, sources
        self._front = None  # the old front's memory can go once gathered

        # 2. Decode up to max(m) tokens for every row.
        toks, lps, ents, counts, hit_eos, (kept, kept_pending, alive) = self._decode(
            cache, pending, torch.tensor(m, device=self.device), [requests[i].stop for i in order]
        )

        # 3. Outputs, and the rows the next call may continue from (those that ran every step, no EOS).
        outputs: list[Optional[SegmentOutput]] = [None] * len(requests)
        counts_l, eos_l = counts.tolist(), hit_eos.tolist()
        toks_l, lps_l, ents_l = toks.tolist(), lps.tolist(), ents.tolist()
        for j, i in enumerate(order):
            n = counts_l[j]
            outputs[i] = SegmentOutput(toks_l[j][:n], lps_l[j][:n], ents_l[j][:n], bool(eos_l[j]))
        self.stats.decode_tokens += sum(counts_l)
        index = {
            (requests[order[j]].group, requests[order[j]].node_id): row
            for row, j in enumerate(alive.tolist())
            if not eos_l[j]
        }
        self._front = _Rows(kept, kept_pending, index, kept.lens.tolist()) if index else None
        return outputs  # type: ignore[return-value]

    # -- internals --------------------------------------------------------------------------
    def _sources(self, requests: Sequence[SegmentRequest]) -> list[tuple[_Rows, int]]:
        """(rows, row) holding each request's context, all but its last token cached.

        A child of a node decoded in the last call continues that node's row. A child of the root
        starts from its prompt's root (prefilled once per prompt). Any other request (a fallback
        branch) starts from a staged row: root + its kept prefix, prefilled once per fork point
        however many siblings grow from it.
        """
        front = self._front
        prefixes: dict[tuple[int, tuple], list[int]] = {}
        missing: dict[int, tuple[int, ...]] = {}
        where: list[tuple[str, object]] = []
        for r in requests:
            key = (r.group, r.parent_id)
            row = front.index.get(key) if front is not None else None
            # A front row continues a request only if it holds exactly this context (prompt + prefix).
            if row is not None and front.lengths[row] + 1 == sum(len(chunk) for chunk in r.context):
                where.append(("front", row))
                continue
            root = self._roots.get(r.group)
            if root is None or root[0] != tuple(r.context[0]):
                missing[r.group] = tuple(r.context[0])
            if len(r.context) == 1:
                where.append(("root", r.group))
            else:
                prefixes.setdefault(key, [t for chunk in r.context[1:] for t in chunk])
                where.append(("prefix", key))
        if missing:
            self._prefill_roots(missing)
        staged = self._prefill_prefixes(prefixes) if prefixes else None
        out: list[tuple[_Rows, int]] = []
        for kind, ref in where:
            if kind == "front":
                out.append((front, ref))  # type: ignore[arg-type]
            elif kind == "root":
                out.append((self._roots[ref][1], 0))  # type: ignore[index]
            else:
                out.append((staged, staged.index[ref]))  # type: ignore[union-attr]
        return out

    def _prefill_prefixes(self, prefixes: dict[tuple[int, tuple], list[int]]) -> _Rows:
        """One row per fork point: its prompt's root plus the kept prefix, prefilled."""
        keys = sorted(prefixes, key=lambda k: len(prefixes[k]))  # similar lengths share a prefill chunk
        roots = [self._roots[group][1] for group, _ in keys]
        cap = max(root.lengths[0] for root in roots) + max(len(p) for p in prefixes.values()) + 1
        cache = RowCache.gather(_runs([(root, 0) for root in roots]), cap)
        # Feed the root's pending token and all but the prefix's last token, which becomes pending.
        self._prefill(cache, [[int(root.pending[0])] + prefixes[k][:-1] for root, k in zip(roots, keys)])
        pending = torch.tensor([prefixes[k][-1] for k in keys], dtype=torch.long, device=self.device)
        return _Rows(cache, pending, {k: i for i, k in enumerate(keys)}, cache.lens.tolist())

    def _prefill(self, cache: RowCache, feeds: list[list[int]]) -> None:
        """Run each row's tokens through the model, advancing `lens`.

        Rows go in chunks of consecutive rows, each right-padded to its longest row and holding at
        most PREFILL_TOKENS_PER_CALL padded tokens; callers put rows in length order so that
        chunks hold rows of similar length and little padding.
        """
        self.stats.prefill_tokens += sum(len(f) for f in feeds)
        a = 0
        while a < len(feeds):
            z, width = a + 1, len(feeds[a])
            while z < len(feeds) and (z + 1 - a) * max(width, len(feeds[z])) <= PREFILL_TOKENS_PER_CALL:
                width = max(width, len(feeds[z]))
                z += 1
            if width:
                tokens = torch.tensor([f + [0] * (width - len(f)) for f in feeds[a:z]], device=self.device)  # [b, T]
                view = cache.view(a, z)
                self.decoder.forward(tokens, view, want_logits=False)
                view.lens += torch.tensor([len(f) for f in feeds[a:z]], device=self.device)
                self.stats.forward_passes += 1
            a = z

    def _prefill_roots(self, prompts: dict[int, tuple[int, ...]]) -> None:
        groups = sorted(prompts, key=lambda g: len(prompts[g]))
        longest = max(len(prompts[g]) for g in groups)
        cache = RowCache.empty(self.shape, len(groups), max(longest - 1, 1), self.model.dtype, self.device)
        self._prefill(cache, [list(prompts[g][:-1]) for g in groups])
        for row, g in enumerate(groups):
            n = len(prompts[g]) - 1
            one = RowCache(cache.kv[:, :, row : row + 1, :, :n].clone(), cache.lens[row : row + 1].clone())
            last = torch.tensor([prompts[g][-1]], dtype=torch.long, device=self.device)
            self._roots[g] = (prompts[g], _Rows(one, last, {}, [n]))

    def _decode(self, cache: RowCache, pending: torch.Tensor, max_new: torch.Tensor,
                stops: Optional[Sequence[tuple[str, ...]]] = None):
        cfg = self.cfg
        # Rows with stop strings: their last tokens are decoded on the host each step (the sampler cuts exactly).
        watch = {row: [] for row, s in enumerate(stops or ()) if s}
        window = 2 + max((len(x) for row in watch for x in stops[row]), default=0)  # type: ignore[index]
        rows, steps = cache.rows, int(max_new.max())
        toks = torch.zeros(rows, steps, dtype=torch.long, device=self.device)
        lps = torch.zeros(rows, steps, device=self.device)
        ents = torch.zeros(rows, steps, device=self.device)
        counts = torch.zeros(rows, dtype=torch.long, device=self.device)
        hit_eos = torch.zeros(rows, dtype=torch.bool, device=self.device)
        stopped = max_new <= 0
        alive = torch.arange(rows, device=self.device)  # batch row -> original row
        ran = 0
        for step in range(steps):
            logits = self.decoder.forward(pending[:, None], cache, want_logits=True)  # [b, V]
            live = ~stopped[alive]  # [b]: rows still producing tokens
            # A stopped row still runs (until compaction) but keeps rewriting one column past its
            # output, so no row outgrows the capacity or the positions that its request asked for.
            cache.lens += live.long()
            self.stats.forward_passes += 1
            self.stats.computed_decode_rows += cache.rows
            tok, lp, ent = sample_tokens(logits, cfg.temperature, cfg.top_p, cfg.top_k, self.generator)
            ran = step + 1
            target = alive[live]
            toks[target, step], lps[target, step], ents[target, step] = tok[live], lp[live], ent[live]
            counts[target] += 1
            is_eos = torch.isin(tok, self._eos) if not cfg.ignore_eos else torch.zeros_like(live)
            hit_eos[target] |= is_eos[live]
            stopped[alive] |= live & (is_eos | (counts[alive] >= max_new[alive]))
            if watch:
                hits = self._stop_hits(tok, live, alive, stops, watch, window)  # type: ignore[arg-type]
                if hits:
                    stopped[torch.tensor(hits, device=self.device)] = True
            pending = tok
            if (step + 1) % self._check_every and step + 1 < steps:
                continue
            n_stopped = int(stopped[alive].sum())
            if self.on_progress is not None:
                self.on_progress(f"token {step + 1}/{steps}, {len(alive) - n_stopped} paths")
            if n_stopped == len(alive):
                break
            if n_stopped * 4 >= len(alive) and steps - step > 2:  # compact: stop computing stopped rows
                keep = (~stopped[alive]).nonzero().squeeze(-1)
                cache, pending, alive = cache.select(keep), pending[keep], alive[keep]
        # Rows that ran every step hold exactly their context + output (their last token pending).
        full = (counts[alive] == ran).nonzero().squeeze(-1)
        live_rows = (cache.select(full), pending[full], alive[full]) if len(full) < len(alive) else (cache, pending, alive)
        return toks, lps, ents, counts, hit_eos, live_rows

    def _stop_hits(self, tok: torch.Tensor, live: torch.Tensor, alive: torch.Tensor,
                   stops: Sequence[tuple[str, ...]], watch: dict[int, list[int]], window: int) -> list[int]:
        """Rows (original indices) whose text now holds one of their stop strings."""
        hits = []
        for t, ok, row in zip(tok.tolist(), live.tolist(), alive.tolist()):
            tail = watch.get(row)
            if tail is None or not ok:
                continue
            tail.append(t)
            del tail[:-window]
            text = self.tokenizer.decode(tail, skip_special_tokens=True)
            if any(s in text for s in stops[row]):
                hits.append(row)
        return hits


def _runs(parts: list[tuple[_Rows, int]]) -> list[tuple[RowCache, torch.Tensor]]:
    """Group consecutive rows from the same source into (cache, row indices) runs for `RowCache.gather`."""
    runs: list[tuple[RowCache, list[int]]] = []
    for src, row in parts:
        if runs and runs[-1][0] is src.cache:
            runs[-1][1].append(row)
        else:
            runs.append((src.cache, [row]))
    return [(c, torch.tensor(rows, dtype=torch.long, device=c.kv.device)) for c, rows in runs]
