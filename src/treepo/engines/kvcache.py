"""A batched KV cache whose rows have their own lengths, forked and pruned by row index.

All layers live in one tensor so that forking a child from its parent (`select` with repeated
row indices) or dropping finished paths is a single `index_select`:

    kv: [L, 2, B, H_kv, cap, D]     L layers, keys (0) and values (1), B rows (paths), cap columns
    lens: [B]                        positions written per row; row r's next token goes to column lens[r]

Rows are right-padded: row r's valid columns are [0, lens[r]); columns past that may hold stale
values, which the attention mask (`attention_mask`) hides and the next write overwrites.
Token positions equal column indices, so position ids are `lens[r] + i`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer


@dataclass
class RowCache:
    kv: torch.Tensor  # [L, 2, B, H_kv, cap, D]
    lens: torch.Tensor  # [B] int64, on kv.device

    @classmethod
    def empty(cls, shape: tuple[int, int, int], rows: int, cap: int, dtype, device) -> "RowCache":
        layers, heads, dim = shape
        kv = torch.zeros(layers, 2, rows, heads, cap, dim, dtype=dtype, device=device)
        return cls(kv, torch.zeros(rows, dtype=torch.long, device=device))

    @property
    def rows(self) -> int:
        return self.kv.shape[2]

    @property
    def cap(self) -> int:
        return self.kv.shape[4]

    def view(self, start: int, stop: int) -> "RowCache":
        """Rows [start, stop) sharing storage: writes through the view land in this cache."""
        return RowCache(self.kv[:, :, start:stop], self.lens[start:stop])

    def select(self, index: torch.Tensor) -> "RowCache":
        """A new cache of the given rows (repeats fork a row), with the same capacity."""
        return RowCache(self.kv.index_select(2, index), self.lens[index].clone())

    @classmethod
    def gather(cls, parts: Sequence[tuple["RowCache", torch.Tensor]], cap: int) -> "RowCache":
        """Stack rows from several caches (each part: a cache and the row indices to take) into one of `cap` columns."""
        first = parts[0][0].kv
        rows = sum(len(index) for _, index in parts)
        layers, _, _, heads, _, dim = first.shape
        out = cls.empty((layers, heads, dim), rows, cap, first.dtype, first.device)
        at = 0
        for cache, index in parts:
            n, used = len(index), int(cache.lens[index].max()) if len(index) else 0
            if n:
                out.kv[:, :, at : at + n, :, :used] = cache.kv[:, :, :, :, :used].index_select(2, index)
                out.lens[at : at + n] = cache.lens[index]
            at += n
        return out


def attention_mask(lens: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
    """Boolean mask [B, 1, q_len, kv_len]: query i of row r (at column lens[r] + i) sees columns <= its own."""
    q_pos = lens[:, None] + torch.arange(q_len, device=lens.device)  # [B, T]
    cols = torch.arange(kv_len, device=lens.device)  # [S]
    return (cols[None, None, :] <= q_pos[:, :, None])[:, None]  # [B, 1, T, S]


def write_columns(lens: torch.Tensor, q_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices [B, 1], [B, T] where a forward of q_len tokens writes its keys and values."""
    rows = torch.arange(lens.shape[0], device=lens.device)[:, None]
    return rows, lens[:, None] + torch.arange(q_len, device=lens.device)


class _RowLayer(DynamicLayer):
    """One layer of `HFRowCache`: writes new keys/values at each row's own columns."""

    def __init__(self, cache: RowCache, layer: int, rows: torch.Tensor, cols: torch.Tensor, kv_len: int):
        super().__init__()
        self.store, self.layer, self.rows, self.cols, self.kv_len = cache, layer, rows, cols, kv_len
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states, value_states: [B, H_kv, T, D]
        keys, values = self.store.kv[self.layer, 0], self.store.kv[self.layer, 1]  # [B, H_kv, cap, D]
        keys[self.rows, :, self.cols] = key_states.transpose(1, 2).to(keys.dtype)  # [B, T, H_kv, D] at (r, c)
        values[self.rows, :, self.cols] = value_states.transpose(1, 2).to(values.dtype)
        return keys[:, :, : self.kv_len], values[:, :, : self.kv_len]  # [B, H_kv, S, D]

    def get_seq_length(self) -> int:
        return self.kv_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.kv_len, 0


class HFRowCache(Cache):
    """A transformers `Cache` over a `RowCache`, for the model's own forward (the generic backend).

    Used for one forward of `q_len` tokens per row; pair it with a 4D `attention_mask` and explicit
    position ids so that the model never derives either from the cache.
    """

    def __init__(self, cache: RowCache, q_len: int):
        rows, cols = write_columns(cache.lens, q_len)
        kv_len = int(cache.lens.max()) + q_len
        layers = [_RowLayer(cache, i, rows, cols, kv_len) for i in range(cache.kv.shape[0])]
        super().__init__(layers=layers)


def cache_argument(model) -> str:
    """The forward keyword that takes a KV cache: 'cache' in newer transformers (5.24+, where
    'past_key_values' is deprecated), 'past_key_values' before."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
