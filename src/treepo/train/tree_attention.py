"""Tree attention whose memory grows with the tokens, not with their square.

A packed row (see `packing`) holds a tree's unique tokens in depth-first pre-order, and

    token q sees token k   iff   k <= q < k + size(k)   (k is q or an ancestor: a subtree is a contiguous run)

The dense path writes that rule out as an additive `[B, 1, N, N]` mask: at the paper's shape
(w=16, depth 14 x 512: about 60,000 to 100,000 unique tokens) 3.6e9 to 1e10 entries per row. Here the same rule is a
FlexAttention `BlockMask`:

    mask_mod(b, h, q, k) = (k <= q) & (q < end[b, k])         end[b, k] = k + size(k)   [B, N]
    kv blocks of q block i = {j <= i : max(end over block j) > first q of block i}   (any allowed pair)
    full blocks            = {j < i : min(end over block j) > last q of block i}     (every pair allowed)

built directly from `end` in O(N + (N / BLOCK)^2), never evaluating the N x N grid. A model takes it
through transformers' attention interface, so no model code is patched:

- `flex`   on CUDA: transformers' own `flex_attention` implementation (compiled FlexAttention kernels);
- `blocks` anywhere, e.g. on CPU, where FlexAttention has no backward pass (PyTorch 2.13 raises
  "FlexAttention does not support backward on CPU"): `tree_attention_forward` below, registered as
  the implementation "treepo_blocks", reads the same BlockMask and runs block-sparse attention
  tile by tile with a FlashAttention-style backward (it keeps q, k, v, the output and one
  log-sum-exp per query; scores exist for one tile of queries at a time).

The implementation is switched for the forward call only (`attention_implementation`), so a model
that re-runs its forward in the backward pass (activation checkpointing) cannot use these forms:
`packing.choose_attention` refuses them for such a model.

`packing.choose_attention` picks the path per run and logs it; the dense mask stays the fallback.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch

try:  # FlexAttention's block-mask type (PyTorch >= 2.5)
    from torch.nn.attention.flex_attention import BlockMask
except ImportError:  # pragma: no cover - older torch: only the dense mask
    BlockMask = None

BLOCK = 128  # BlockMask tile (FlexAttention's default sparse block size)
Q_TILE = 4  # query blocks per tile of the block-sparse kernel: scores are [H, Q_TILE * BLOCK, kv tokens]
IMPLEMENTATION = "treepo_blocks"  # the name `tree_attention_forward` is registered under in transformers


def available() -> bool:
    """True where this torch has FlexAttention's BlockMask (the block paths need it)."""
    return BlockMask is not None


# ---------------------------------------------------------------------------------------------
# The block mask
# ---------------------------------------------------------------------------------------------


def tree_ends(sizes: list[list[int]], length: int) -> torch.Tensor:
    """[B, N] long: end[b, k] = k + size(k), one past token k's subtree; padding (k >= len) sees only itself."""
    ends = torch.arange(1, length + 1, dtype=torch.long).repeat(len(sizes), 1)  # padding: k + 1
    for b, size in enumerate(sizes):
        ends[b, : len(size)] = torch.arange(len(size)) + torch.tensor(size, dtype=torch.long)
    return ends


def tree_block_mask(ends: torch.Tensor, block: Optional[int] = None) -> "BlockMask":
    """The FlexAttention BlockMask of the pre-order ancestor rule for rows with these `ends` [B, N]
    (tiles of `block` x `block`, default BLOCK)."""
    block = block or BLOCK
    if BlockMask is None:
        raise RuntimeError("this torch has no FlexAttention (torch.nn.attention.flex_attention); use the dense mask")
    B, N = ends.shape
    nb = -(-N // block)
    padded = torch.arange(1, nb * block + 1, device=ends.device).repeat(B, 1)  # tail past N: sees only itself
    padded[:, :N] = ends
    tiles = padded.view(B, nb, block)
    max_end, min_end = tiles.amax(-1), tiles.amin(-1)  # [B, nb] over each kv block
    first_q = torch.arange(nb, device=ends.device) * block  # [nb] first query of each q block
    last_q = first_q + block - 1
    i, j = torch.arange(nb, device=ends.device)[:, None], torch.arange(nb, device=ends.device)[None, :]
    visible = (j <= i) & (max_end[:, None, :] > first_q[None, :, None])  # [B, nb(q), nb(kv)]
    full = (j < i) & (min_end[:, None, :] > last_q[None, :, None])  # [B, nb, nb]
    partial = visible & ~full

    def blocks(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = keep.sum(-1).to(torch.int32)[:, None]  # [B, 1, nb]
        order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True).to(torch.int32)[:, None]  # [B, 1, nb, nb]
        return count, order

    end = padded  # [B, nb * block], captured by the mask function

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx < end[b, kv_idx])

    kv_num, kv_idx = blocks(partial)
    full_num, full_idx = blocks(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(N, N))


def _tile_keys(block_mask: "BlockMask", b: int, first: int, last: int, n: int) -> torch.Tensor:
    """[M] sorted key positions of every kv block (partial or full) that q blocks first..last-1 of row b see."""
    parts = []
    for num, idx in ((block_mask.kv_num_blocks, block_mask.kv_indices),
                     (block_mask.full_kv_num_blocks, block_mask.full_kv_indices)):
        if num is None:
            continue
        for i in range(first, last):
            parts.append(idx[b, 0, i, : int(num[b, 0, i])])
    kv_block = block_mask.BLOCK_SIZE[1]
    ids = torch.unique(torch.cat(parts).long()) if parts else torch.zeros(0, dtype=torch.long)  # [kv blocks]
    keys = (ids[:, None] * kv_block + torch.arange(kv_block, device=ids.device)[None, :]).flatten()
    return keys[keys < n]


def _tiles(block_mask: "BlockMask", n: int, device) -> list[tuple[int, slice, torch.Tensor, torch.Tensor]]:
    """(row, query slice, key positions [M], allowed [T, M]) per tile of Q_TILE query blocks of an N = n
    row. The same for every layer and for the backward pass: computed once per BlockMask and kept on it."""
    cached = getattr(block_mask, "_treepo_tiles", None)
    if cached is not None and cached[0] == (n, Q_TILE, str(device)):
        return cached[1]
    tiles = []
    q_block = block_mask.BLOCK_SIZE[0]
    nb = -(-n // q_block)
    for b in range(block_mask.kv_num_blocks.shape[0]):
        for first in range(0, nb, Q_TILE):
            last = min(first + Q_TILE, nb)
            rows = slice(first * q_block, min(last * q_block, n))
            keys = _tile_keys(block_mask, b, first, last, n).to(device)
            q_idx = torch.arange(rows.start, rows.stop, device=device)
            bb = torch.full((), b, device=device, dtype=torch.long)
            allowed = block_mask.mask_mod(bb, None, q_idx[:, None], keys[None, :])  # [T, M]
            tiles.append((b, rows, keys, allowed))
    block_mask._treepo_tiles = ((n, Q_TILE, str(device)), tiles)
    return tiles


# ---------------------------------------------------------------------------------------------
# Block-sparse attention with a recomputing backward
# ---------------------------------------------------------------------------------------------


class BlockSparseAttention(torch.autograd.Function):
    """softmax(q k^T * scale + mask) v over the blocks a BlockMask keeps, one tile of queries at a time.

    q [B, H, N, D]; k, v [B, Hkv, N, D] with H = Hkv * rep (grouped-query attention: query head h
    reads kv head h // rep, as transformers' repeat_kv lays them out); returns [B, H, N, D]. Saves
    q, k, v, the output and the log-sum-exp [B, H, N]; the backward recomputes each tile's scores.
    Scores, softmax and accumulations run in float32 with autocast off (under accelerate's mixed
    precision the forward runs inside autocast, the backward outside: both must compute the same p).
    """

    @staticmethod
    def forward(ctx, q, k, v, block_mask, scale):
        B, H, N, D = q.shape
        hkv = k.shape[1]
        rep = H // hkv
        out = torch.empty_like(q)  # [B, H, N, D]
        lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)  # [B, H, N]
        with torch.autocast(q.device.type, enabled=False):
            for b, rows, keys, allowed in _tiles(block_mask, N, q.device):
                qt = q[b, :, rows].float().view(hkv, rep, -1, D)  # [Hkv, rep, T, D]
                kt, vt = k[b, :, keys].float()[:, None], v[b, :, keys].float()[:, None]  # [Hkv, 1, M, D]
                s = torch.matmul(qt, kt.transpose(-1, -2)) * scale  # [Hkv, rep, T, M]
                s = s.masked_fill(~allowed, float("-inf"))
                m = torch.logsumexp(s, dim=-1)  # [Hkv, rep, T]
                p = torch.exp(s - m[..., None])  # [Hkv, rep, T, M]
                out[b, :, rows] = torch.matmul(p, vt).view(H, -1, D).to(q.dtype)  # [H, T, D]
                lse[b, :, rows] = m.view(H, -1)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.block_mask, ctx.scale = block_mask, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        scale = ctx.scale
        B, H, N, D = q.shape
        hkv = k.shape[1]
        rep = H // hkv
        with torch.autocast(q.device.type, enabled=False):
            dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
            dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
            dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
            delta = (grad_out.float() * out.float()).sum(-1)  # [B, H, N] = rowsum(dO * O)
            for b, rows, keys, allowed in _tiles(ctx.block_mask, N, q.device):
                qt = q[b, :, rows].float().view(hkv, rep, -1, D)  # [Hkv, rep, T, D]
                kt, vt = k[b, :, keys].float()[:, None], v[b, :, keys].float()[:, None]  # [Hkv, 1, M, D]
                do = grad_out[b, :, rows].float().view(hkv, rep, -1, D)  # [Hkv, rep, T, D]
                s = torch.matmul(qt, kt.transpose(-1, -2)) * scale  # [Hkv, rep, T, M]
                lse_t = lse[b, :, rows].view(hkv, rep, -1, 1)
                p = torch.exp(s.masked_fill(~allowed, float("-inf")) - lse_t)  # [Hkv, rep, T, M]
                dv[b].index_add_(1, keys, torch.matmul(p.transpose(-1, -2), do).sum(1))  # [Hkv, M, D]
                dp = torch.matmul(do, vt.transpose(-1, -2))  # [Hkv, rep, T, M]
                ds = p * (dp - delta[b, :, rows].view(hkv, rep, -1, 1)) * scale  # [Hkv, rep, T, M]
                dq[b, :, rows] = torch.matmul(ds, kt).view(H, -1, D)  # [H, T, D]
                dk[b].index_add_(1, keys, torch.matmul(ds.transpose(-1, -2), qt).sum(1))  # [Hkv, M, D]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def tree_attention_forward(module, query, key, value, attention_mask, scaling: Optional[float] = None,
                           dropout: float = 0.0, softcap: Optional[float] = None, s_aux=None, **kwargs):
    """A transformers attention function: query [B, H, N, D], key/value [B, Hkv, N, D], attention_mask a
    BlockMask -> (output [B, N, H, D], None). Raises on what it cannot honour (the probe then falls back)."""
    if BlockMask is None or not isinstance(attention_mask, BlockMask):
        raise TypeError(f"{IMPLEMENTATION} attention needs a FlexAttention BlockMask, got {type(attention_mask).__name__}")
    if dropout or softcap is not None or s_aux is not None or kwargs.get("sliding_window"):
        raise ValueError(f"{IMPLEMENTATION} attention has no dropout, logit softcap, attention sinks or sliding window")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"{query.shape[1]} query heads are not a multiple of {key.shape[1]} key-value heads")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = BlockSparseAttention.apply(query, key, value, attention_mask, scale)  # [B, H, N, D]
    return out.transpose(1, 2).contiguous(), None


_registered = False


def register() -> bool:
    """Register `tree_attention_forward` with transformers (once); False where transformers cannot take it."""
    global _registered
    if not _registered:
        try:
            from transformers import AttentionInterface
        except ImportError:
            return False
        AttentionInterface.register(IMPLEMENTATION, tree_attention_forward)
        _registered = True
    return True


@contextmanager
def attention_implementation(model, name: Optional[str]) -> Iterator[None]:
    """Run `model` (or the module inside a DDP wrapper) with attention implementation `name` for a while;
    then restore what it had, sub-config by sub-config (a composite model may mix implementations)."""
    config = getattr(getattr(model, "module", model), "config", None)
    if name is None or config is None:
        yield
        return
    before = {"": config._attn_implementation}
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            before[key] = getattr(sub, "_attn_implementation", None)
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before if len(before) > 1 else before[""]
