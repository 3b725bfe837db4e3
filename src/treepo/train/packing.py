"""Tree-packed forward passes: every shared token of a step computed once, not once per trajectory.

Flat training runs each trajectory as its own row, so a prompt and every segment above a fork
are recomputed once per descendant. Packing lays a micro-batch's sequences (prompt + response
of each trajectory) into a prefix trie and writes the trie out depth-first, one row:

    row        = the unique tokens of the trie, in depth-first (pre-)order     [N]
    position   = the token's depth in the trie = its position in its own sequence
    attention  = token q sees token k  iff  k is q or one of q's ancestors
               = k <= q < k + size(k)       (pre-order: a subtree is a contiguous run)

Two trajectories of one tree share their prompt and every segment above their fork token for
token, so the trie holds each segment once (and a system prompt common to several prompts once).
A token has one path to the root, so its log-prob is the same for every trajectory carrying it:
it is read from the logits of its predictor (its parent in the trie). The loss gathers those
per-token log-probs back into the flat `[S, R]` layout of `logprobs.collate` (one row per
trajectory) and applies `ppo_loss` unchanged: a shared token's loss is the sum over the
trajectories that carry it, each with its own advantage, normalised as the flat token-mean is.
The gather's backward adds the copies' gradients, so gradients equal the flat computation's.

The mask takes one of three forms (`ATTENTION`), chosen per run by `choose_attention`:
- `flex`: a FlexAttention BlockMask run by transformers' `flex_attention` (CUDA);
- `blocks`: the same BlockMask run by treepo's block-sparse kernel (`tree_attention`; any device);
- `dense`: an additive `[B, 1, N, N]` tensor, which HF models pass straight to eager and sdpa.
The first two grow with N (blocks of the mask that no pair needs are skipped); the dense mask
grows with N^2 and is the fallback. The block forms switch the model's attention implementation
for the packed pass, so they serve a model loaded with any implementation whose flat pass runs;
the dense form needs eager or sdpa. Models no form can serve (a model that ignores custom masks)
are found by a probe against flat log-probs and trained flat, and a micro-batch whose sequences
pass a sliding attention window runs flat.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..errors import InputError
from . import tree_attention as ta
from .logprobs import Batch, Sample, collate, token_logprobs

log = logging.getLogger(__name__)

PACKABLE_ATTENTION = ("eager", "sdpa")  # implementations that take the dense mask
ATTENTION = ("flex", "blocks", "dense")  # the forms of the tree mask, memory-lean first
# Under `--packed_attention auto`, rows up to this many tokens take the dense mask when the model can (16 MiB of
# float32 per row): at a few hundred to a thousand tokens sdpa's fused kernel beats the block-sparse loop by
# ~10% (benchmarks/packed_training.py), from a few thousand on the block mask is faster and far smaller.
DENSE_UP_TO = 2048


class PackingError(InputError):
    """These samples cannot be packed (a row would pass the limit); flat computation still works."""


# ---------------------------------------------------------------------------------------------
# The trie and its depth-first layout (pure Python, no model)
# ---------------------------------------------------------------------------------------------


@dataclass
class PackedRow:
    """One packed row: the unique tokens of some sequences, and where each sequence's tokens are."""

    tokens: list[int]  # [N] unique tokens in depth-first order
    depth: list[int]  # [N] position ids: each token's index in its own sequence
    size: list[int]  # [N] subtree sizes: token k's descendants are k+1 .. k+size[k]-1
    paths: list[list[int]]  # per sequence, the row index of each of its tokens

    def __len__(self) -> int:
        return len(self.tokens)


def pack_sequences(sequences: Sequence[Sequence[int]]) -> PackedRow:
    """Lay token sequences out as a depth-first trie: identical prefixes become one run of tokens."""
    # trie nodes: token, children {token: node}; node 0 is a virtual root holding no token
    tok: list[int] = [-1]
    kids: list[dict[int, int]] = [{}]
    ends: list[list[int]] = []
    for seq in sequences:
        node, path = 0, []
        for t in seq:
            nxt = kids[node].get(t)
            if nxt is None:
                nxt = len(tok)
                tok.append(int(t))
                kids.append({})
                kids[node][t] = nxt
            path.append(nxt)
            node = nxt
        ends.append(path)
    # depth-first pre-order, children in first-seen order (dicts keep insertion order)
    order: list[int] = [0] * len(tok)  # trie node -> row index
    tokens, depth, size = [], [], []
    stack: list[tuple[int, int, bool]] = [(c, 0, False) for c in reversed(list(kids[0].values()))]
    while stack:
        node, d, done = stack.pop()
        if done:  # all descendants are written: close the subtree
            size[order[node]] = len(tokens) - order[node]
            continue
        order[node] = len(tokens)
        tokens.append(tok[node])
        depth.append(d)
        size.append(1)
        stack.append((node, d, True))
        stack.extend((c, d + 1, False) for c in reversed(list(kids[node].values())))
    return PackedRow(tokens, depth, size, [[order[n] for n in path] for path in ends])


def tree_attention(rows: Sequence[PackedRow], length: int) -> torch.Tensor:
    """[B, N, N] bool: q sees k iff k is q or an ancestor of q. Padding sees only itself."""
    return dense_allowed(ta.tree_ends([r.size for r in rows], length))


def dense_allowed(ends: torch.Tensor) -> torch.Tensor:
    """[B, N, N] bool from ends [B, N] (k + size(k)): allowed[b, q, k] = k <= q < ends[b, k]."""
    idx = torch.arange(ends.shape[1], device=ends.device)
    return (idx[None, None, :] <= idx[None, :, None]) & (idx[None, :, None] < ends[:, None, :])


# ---------------------------------------------------------------------------------------------
# Batches for the model
# ---------------------------------------------------------------------------------------------


@dataclass
class PackedBatch:
    """Packed rows plus the flat layout the loss uses.

    input_ids / position_ids   [B, N]
    ends                       [B, N]        k + size(k): token q sees k iff k <= q < ends[b, k]
    attention                  the mask's form (`ATTENTION`): 'dense' builds an additive [B, 1, N, N]
                               mask, 'flex' and 'blocks' a BlockMask (`mask()` builds it once)
    keep                       [K]           row columns whose logits are needed (predictors)
    row                        [S]           packed row of each trajectory
    pred / target              [S, R]        index into `keep` of each response token's predictor;
                                              response token ids (0 on padding)
    flat                       the `logprobs.Batch` of the same samples (mask, advantages, old log-probs)
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    ends: torch.Tensor
    keep: torch.Tensor
    row: torch.Tensor
    pred: torch.Tensor
    flat: Batch
    packed_tokens: int  # unique tokens in all rows (no padding)
    flat_tokens: int  # tokens the flat layout would run (prompt + response per trajectory, no padding)
    attention: str = "dense"
    dtype: torch.dtype = torch.float32  # of the dense additive mask (the model's)

    def to(self, device) -> "PackedBatch":
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()
                 if k != "_mask"}
        moved["flat"] = self.flat.to(device)
        return PackedBatch(**moved)

    def mask(self):
        """The attention mask in this batch's form, built on first use and kept (the reference model's pass
        and the policy's share it); `to()` drops it, so it is rebuilt on the new device."""
        if getattr(self, "_mask", None) is None:
            if self.attention == "dense":
                allowed = dense_allowed(self.ends)[:, None]  # [B, 1, N, N]
                self._mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.ends.device).masked_fill_(
                    ~allowed, torch.finfo(self.dtype).min)
            else:
                self._mask = ta.tree_block_mask(self.ends)  # BlockMask, O(N) memory
        return self._mask


def pack_samples(samples: Sequence[Sample], pad_id: int, dtype: torch.dtype = torch.float32,
                 max_tokens: Optional[int] = None, window: Optional[int] = None,
                 attention: str = "dense", dense_up_to: int = 0) -> PackedBatch:
    """Pack samples into rows; the samples of one `group` (prompt) always share a row.

    `attention` is the mask's form (`ATTENTION`); `dtype` that of a dense mask. Rows of at most
    `dense_up_to` tokens take the dense mask whatever `attention` says (it is faster there).
    Groups fill a row in order until its unique tokens would pass `max_tokens` (None: a single
    row). A group whose own tree passes `max_tokens`, or a sequence longer than a sliding
    attention `window`, raises `PackingError` naming its prompt.
    """
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, not {attention!r}")
    if window:
        longest = max(samples, key=lambda s: len(s.prompt_ids) + len(s.response_ids))
        if len(longest.prompt_ids) + len(longest.response_ids) > window:
            raise PackingError(f"prompt {longest.meta.get('prompt', longest.group)}: a sequence of "
                               f"{len(longest.prompt_ids) + len(longest.response_ids)} tokens passes the model's "
                               f"sliding attention window of {window}, which the tree mask cannot express; "
                               "it runs flat (or use shorter responses).")
    flat = collate(samples, pad_id)
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s.group, []).append(i)
    members: list[list[int]] = [[]]  # per row, its sample indices
    alone: dict[int, PackedRow] = {}  # first sample index -> its group packed on its own
    used = 0
    for g, idx in groups.items():
        alone[idx[0]] = _pack(samples, idx)
        n = len(alone[idx[0]])
        if max_tokens and n > max_tokens:
            name = samples[idx[0]].meta.get("prompt", g)
            raise PackingError(f"prompt {name}: its {len(idx)} trajectories pack to {n} unique tokens, beyond the "
                               f"packed-row limit of {max_tokens} (the model's context); use shorter trees "
                               "(--width, --depth, --segment_len) or flat training (--no_packing).")
        if max_tokens and members[-1] and used + n > max_tokens:
            members.append([])
            used = 0
        members[-1] += idx
        used += n
    # A row of one group is that group's trie; a row of several packs their union (shared prefixes meet).
    rows = [alone[m[0]] if len(m) == len(groups[samples[m[0]].group]) else _pack(samples, m) for m in members]

    B, N = len(rows), max(len(r) for r in rows)
    if N <= dense_up_to:
        attention = "dense"
    if attention == "flex":  # whole blocks: fewer distinct shapes for FlexAttention's compiled kernels
        N = -(-N // ta.BLOCK) * ta.BLOCK
    ids = torch.full((B, N), pad_id, dtype=torch.long)
    pos = torch.zeros((B, N), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r.tokens)
        pos[b, : len(r)] = torch.tensor(r.depth)

    S, R = flat.response_ids.shape
    row = torch.zeros(S, dtype=torch.long)
    col = torch.zeros((S, R), dtype=torch.long)  # [S, R] row column of each response token's predictor
    real = torch.zeros((S, R), dtype=torch.bool)  # [S, R] every response token, loss-masked or not
    for b, (r, m) in enumerate(zip(rows, members)):
        for path, i in zip(r.paths, m):
            p, n = len(samples[i].prompt_ids), len(samples[i].response_ids)
            row[i] = b
            col[i, :n] = torch.tensor(path[p - 1 : p + n - 1], dtype=torch.long)  # token t: predicted at p+t-1
            real[i, :n] = True
    # Logits only at predictor columns (one set for all rows: the union of the rows').
    keep = torch.unique(col[real])  # [K]
    lookup = torch.zeros(N, dtype=torch.long)
    lookup[keep] = torch.arange(len(keep))
    return PackedBatch(ids, pos, ta.tree_ends([r.size for r in rows], N), keep, row, lookup[col], flat,
                       packed_tokens=sum(len(r) for r in rows),
                       flat_tokens=sum(len(s.prompt_ids) + len(s.response_ids) for s in samples),
                       attention=attention, dtype=dtype)


def _pack(samples: Sequence[Sample], idx: Sequence[int]) -> PackedRow:
    return pack_sequences([list(samples[i].prompt_ids) + list(samples[i].response_ids) for i in idx])


def packed_logprobs(model, batch: PackedBatch, temperature: float = 1.0, with_entropy: bool = False
                    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(log-probs [S, R], entropies [S, R] or None) of every trajectory's response tokens, in the
    flat layout of `batch.flat`, from one packed forward pass (see `logprobs.response_logprobs`)."""
    implementation = {"flex": "flex_attention", "blocks": ta.IMPLEMENTATION}.get(batch.attention)
    if batch.attention == "blocks":
        ta.register()
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.mask(), position_ids=batch.position_ids)
    rows = batch.row[:, None].expand_as(batch.pred)  # [S, R]
    with ta.attention_implementation(model, implementation):
        return token_logprobs(model, inputs, batch.keep, (rows, batch.pred), batch.flat.response_ids, temperature,
                              with_entropy)


# ---------------------------------------------------------------------------------------------
# Which models can be packed
# ---------------------------------------------------------------------------------------------


def sliding_window(model) -> Optional[int]:
    """The attention window of a model with sliding-window layers (None: full attention everywhere).

    The tree mask replaces the model's own mask in every layer, so packing is exact only while no
    sequence is longer than the window (`pack_samples(window=...)` checks that).
    """
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None)
    kinds = getattr(config, "layer_types", None)
    if not window or (kinds is not None and "sliding_attention" not in kinds):
        return None
    return int(window)


def choose_attention(model, want: str = "auto", reference=None) -> tuple[Optional[str], list[str]]:
    """(the tree mask's form this run uses, or None to train flat; why each form tried first was refused).

    `want` 'auto' tries `ATTENTION` in order ('flex' only on CUDA); a named form is tried alone.
    A form is taken when a packed forward and backward pass through it runs and its log-probs equal
    flat ones on a probe tree of more than one 128-token block (and, for a `reference` model, a
    packed forward pass equals its flat one).
    """
    device = next(model.parameters()).device
    forms = [f for f in ATTENTION if f != "flex" or device.type == "cuda"] if want == "auto" else [want]
    refused = []
    for form in forms:
        reason = _static_reason(model, form) or (_static_reason(reference, form) if reference is not None else None)
        reason = reason or _probe(model, form, backward=True)
        if reason is None and reference is not None:
            reason = _probe(reference, form, backward=False)
            reason = reason and f"the reference model: {reason}"
        if reason is None:
            return form, refused
        refused.append(f"{form}: {reason}")
    return None, refused


def _static_reason(model, form: str) -> Optional[str]:
    """Why `model` cannot take this form of the mask, judged from its config alone (None: try it)."""
    if form in ("flex", "blocks"):
        if not ta.available():
            return "this torch has no FlexAttention BlockMask"
        if form == "flex" and next(model.parameters()).device.type != "cuda":
            return "FlexAttention has no backward pass off CUDA (use 'blocks', the same mask through treepo's kernel)"
        if form == "blocks" and not ta.register():
            return "this transformers has no AttentionInterface to register the block-sparse kernel with"
        newer = hasattr(type(model), "is_activation_checkpointing")  # transformers 5 warns on the older name
        checkpointing = getattr(model, "is_activation_checkpointing" if newer else "is_gradient_checkpointing", False)
        if checkpointing:
            return ("activation checkpointing re-runs attention in the backward pass, after packing has switched "
                    "the attention implementation back (use 'dense')")
        return None
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl not in PACKABLE_ATTENTION:
        return (f"attention implementation {impl!r} cannot take a dense tree mask (it needs one of "
                f"{', '.join(PACKABLE_ATTENTION)}; load the model with attn_implementation='sdpa')")
    return None


def _probe(model, form: str = "dense", backward: bool = True) -> Optional[str]:
    """Compare packed (through `form`) and flat log-probs on a random tree (a prompt, two forks, two
    blocks' worth of tokens); with `backward`, also run the packed pass's backward (then drop the grads)."""
    from .logprobs import response_logprobs

    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    draw = lambda n: torch.randint(2, vocab, (n,), generator=g).tolist()  # noqa: E731
    prompt, a, b = draw(40), draw(60), draw(30)
    responses = [a + draw(50), a + draw(20), b + draw(40), b]
    samples = [Sample(prompt, r, [0.0] * len(r), [0.0] * len(r)) for r in responses]
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batch = pack_samples(samples, 0, dtype, attention=form).to(device)
    try:
        with torch.no_grad():
            flat, _ = response_logprobs(model, batch.flat)
        with torch.set_grad_enabled(backward):
            packed, _ = packed_logprobs(model, batch)
            if backward and packed.requires_grad:
                packed[batch.flat.response_mask].sum().backward()
    except Exception as exc:  # a model that rejects 4D masks, block masks, position ids or index logits_to_keep
        return f"a packed pass failed on this model ({type(exc).__name__}: {exc})"
    finally:
        if backward:
            model.zero_grad(set_to_none=True)
    diff = float((flat - packed.detach()).abs()[batch.flat.response_mask].max())
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    if not diff <= tol:
        return f"packed log-probs differ from flat ones by {diff:.2g} on a probe tree (the model ignores the tree mask?)"
    return None
