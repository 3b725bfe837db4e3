"""One step's policy update: scored trees -> per-token advantages -> PPO updates (flat or packed).

    samples  = one `Sample` per leaf: prompt, response, per-token advantages (normalised over the
               step's tokens, `--whiten`), the sampler's log-probs
    minis    = `mini_batches` shares of whole prompt groups; `ppo_epochs` passes over each
    update   = gradient accumulation over micro-batches, one optimizer step, normalised to the
               token-mean over the update's tokens on all ranks

A micro-batch runs either flat (`logprobs.collate`: one padded row per trajectory) or packed
(`packing.pack_samples`: the unique tokens of whole prompt groups, one row, a tree mask). Both
give log-probs in the same `[S, R]` layout, so the loss code is one.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import Counter
from typing import Optional, Sequence

import numpy as np
import torch

from ..config import TrainConfig
from ..tree import check_tree
from .advantages import center_groups, scale, token_advantages, whiten
from .logprobs import Batch, Sample, collate, response_logprobs
from .loss import ppo_loss
from .packing import (DENSE_UP_TO, PackedBatch, PackingError, choose_attention, pack_samples, packed_logprobs,
                      sliding_window)

log = logging.getLogger(__name__)


def build_samples(trees, advantage: str, whitening: str, reduce_sum=None) -> list[Sample]:
    """One sample per non-empty leaf, its advantages expanded per token and normalised over the step's
    trained tokens by `whitening` ('token', 'scale', 'group' or 'none'; see `advantages.py`), on every
    rank alike (`reduce_sum` sums a tensor over ranks)."""
    samples = []
    for g, tree in enumerate(trees):
        check_tree(tree)
        leaves = list(tree.leaves)
        rewards = [tree.rewards[leaf] for leaf in leaves]
        ids, seg_lengths = zip(*(tree.model_path(leaf) for leaf in leaves))  # env levels dropped (tree.py)
        counts = tree.multiplicity()
        advs = token_advantages(advantage, ids, rewards, seg_lengths, counts)
        # A particle leaf's advantages carry the factor m x leaves / width; re-centring must see each particle once.
        factors = [m * len(leaves) / sum(counts) for m in counts] if counts is not None else [1.0] * len(leaves)
        for leaf, adv, m, f in zip(leaves, advs, counts or [1] * len(leaves), factors):
            traj = tree.trajectory(leaf)
            if traj.token_ids:
                samples.append(Sample(tree.prompt_ids, traj.token_ids, adv, traj.logprobs, group=g,
                                      meta={"prompt": tree.prompt_index, "particles": m, "factor": f},
                                      loss_mask=traj.loss_mask))
    if whitening == "none":
        return samples  # (every other mode joins the all-reduce below, even on a rank without samples)
    flat = torch.tensor([a for s in samples for a in s.advantages], dtype=torch.float64)  # [N] every token
    mask = torch.tensor([m for s in samples for m in (s.loss_mask or [True] * len(s.advantages))],
                        dtype=torch.bool)  # [N] the trained ones
    # Re-centring ('token', 'group') works on each particle's own advantage, counted once per particle, and
    # puts the particle factor back after; 'scale' divides by a positive constant, so it reads the values as given.
    factor = torch.tensor([s.meta["factor"] for s in samples for _ in s.advantages], dtype=torch.float64)  # [N]
    weight = torch.tensor([s.meta["particles"] for s in samples for _ in s.advantages], dtype=torch.float64)  # [N]
    if whitening in ("token", "group"):
        flat = flat / factor
    if whitening == "group":  # centre each prompt group first; the scale is then the batch's
        groups = torch.tensor([s.group for s in samples for _ in s.advantages])
        flat = center_groups(flat, mask, groups, weight)
    mean = var = None
    if reduce_sum is not None:  # the moments of all ranks' trained tokens (each particle's once)
        w = weight[mask] if whitening in ("token", "group") else torch.ones_like(flat[mask])
        kept = flat[mask]
        moments = reduce_sum(torch.stack([w.sum(), (w * kept).sum(), (w * kept ** 2).sum()]))
        n, total, squares = moments.tolist()
        mean = total / max(n, 1.0)
        var = max(squares / max(n, 1.0) - mean * mean, 0.0)
    if whitening == "token":
        out = whiten(flat, mask, mean=mean, var=var, weight=weight) * factor
    elif whitening == "group":
        out = scale(flat, mask, var=var, weight=weight) * factor
    elif whitening == "scale":
        out = scale(flat, mask, var=var)
    else:
        raise ValueError(f"whitening={whitening!r}: use token, scale, group or none.")
    values, at = out.tolist(), 0
    for s in samples:
        s.advantages, at = values[at : at + len(s.advantages)], at + len(s.advantages)
    return samples


class PolicyUpdate:
    """The PPO update of a step, on a model prepared by accelerate."""

    def __init__(self, cfg: TrainConfig, *, accelerator, model, optimizer, scheduler, reference=None,
                 pad_id: int = 0, temperature: float = 1.0):
        self.cfg, self.accelerator, self.model = cfg, accelerator, model
        self.optimizer, self.scheduler, self.reference = optimizer, scheduler, reference
        self.pad_id, self.temperature = pad_id, temperature
        self.policy = accelerator.unwrap_model(model)
        self.packed = False
        self.attention: Optional[str] = None  # the packed rows' mask form (packing.ATTENTION), None: flat
        self.dense_up_to = 0  # rows this short take the dense mask (auto, when the model can)
        self.pack_limit: Optional[int] = getattr(self.policy.config, "max_position_embeddings", None)
        self.window = sliding_window(self.policy)
        if cfg.packing:
            self.attention, refused = choose_attention(self.policy, cfg.packed_attention, reference)
            if self.attention is None:
                log.warning("packing is off for this run: %s; training runs flat (each trajectory its own row)",
                            "; ".join(refused))
            else:
                if cfg.packed_attention == "auto" and self.attention != "dense" and \
                        choose_attention(self.policy, "dense", reference)[0] == "dense":
                    self.dense_up_to = DENSE_UP_TO
                log.info("packed training: tree mask as %s%s%s", self.attention,
                         f" (rows of up to {self.dense_up_to} tokens: dense, faster there)" if self.dense_up_to else "",
                         f" (not {'; '.join(refused)})" if refused else "")
            self.packed = self.attention is not None
        self.step = 0  # for log messages

    # -- the step -----------------------------------------------------------------------------
    def __call__(self, trees, step: int = 0) -> dict:
        cfg = self.cfg
        self.step = step
        acc = self.accelerator
        reduce_sum = (lambda t: acc.reduce(t.to(acc.device), reduction="sum").cpu()) if acc.num_processes > 1 else None
        samples = build_samples(trees, cfg.advantage, cfg.whitening, reduce_sum)
        self._gap, self._gap_max = Counter(), 0.0  # |engine - policy| log-prob over the step's tokens (engine_gap)
        groups = sorted({s.group for s in samples})
        share = {g: i % cfg.mini_batches for i, g in enumerate(groups)}  # whole groups, dealt round-robin
        minis = [[s for s in samples if share[s.group] == m] for m in range(cfg.mini_batches)]
        if acc.num_processes == 1:
            minis = [m for m in minis if m]
        # else every rank runs every mini-batch's update, empty or not: the gradient all-reduce
        # and the token count are collective calls that all ranks must make alike.
        fresh = cfg.old_logprobs == "recompute" and cfg.mini_batches == 1 and cfg.ppo_epochs == 1
        if cfg.old_logprobs == "recompute" and not fresh:
            for mini in minis:  # the policy before any of this step's updates, batched as the updates are
                self._recompute_old(mini)
        totals = Counter()
        norms = []
        for _ in range(cfg.ppo_epochs):
            for mini in minis:
                stats, norm = self._optimizer_step(mini, detach_old=fresh)
                totals.update(stats)
                if norm is not None:
                    norms.append(norm)
        if acc.num_processes > 1:  # sums over ranks (norms are already equal: gradients are all-reduced)
            from accelerate.utils import gather_object

            totals = sum(gather_object([totals]), Counter())
        n = max(totals["tokens"], 1.0)
        epochs = max(cfg.ppo_epochs, 1)
        out = {
            "loss": totals["loss"] / max(len(norms), 1),
            "pg_loss": totals["pg"] / n,
            "clip_fraction": totals["clipped"] / n,
            "dual_clip_fraction": totals["dual_clipped"] / n,
            "approx_kl_old": totals["approx_kl_old"] / n,
            "grad_norm": float(np.mean(finite)) if (finite := [x for x in norms if math.isfinite(x)]) else None,
            "skipped_updates": len(norms) - len(finite),
            "trained_tokens": int(totals["tokens"] / epochs),
            "packed": self.packed,
            "packed_attention": self.attention or "flat",  # the tree mask's form this run (packing.ATTENTION)
            "block_mask_batches": int(totals["block_mask_batches"] / epochs),  # micro-batches past dense_up_to
            "forward_tokens": int(totals["forward_tokens"] / epochs),  # tokens the model ran (packed: unique)
            "flat_tokens": int(totals["flat_tokens"] / epochs),  # what flat rows would have run
            "packing_fallbacks": int(totals["packing_fallbacks"]),  # packed run's micro-batches that ran flat
        }
        if self.reference is not None:
            out["kl_ref"] = totals["kl"] / n
        gap, top = self._gap, self._gap_max
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            parts = gather_object([(gap, top)])
            gap, top = sum((p[0] for p in parts), Counter()), max(p[1] for p in parts)
        # How far the sampler's log-probs sit from the policy's before the update: ~0 for the embedded
        # engine; a server's quantised or otherwise different forward shows here (the PPO ratio uses the policy's).
        out["engine_logprob_gap"] = gap["sum"] / gap["tokens"] if gap["tokens"] else None
        out["engine_logprob_gap_max"] = top if gap["tokens"] else None
        return out

    # -- micro-batches ------------------------------------------------------------------------
    def _chunks(self, samples: Sequence[Sample]) -> list[list[Sample]]:
        """Micro-batches of an update; the same split every time it is asked.

        Flat: `micro_batch_size` trajectories, shortest first (less padding). Packed: whole prompt
        groups (their shared prefixes must meet), as many as fit in `micro_batch_size` trajectories,
        at least one.
        """
        size = self.cfg.micro_batch_size
        if not self.packed:
            order = sorted(samples, key=lambda s: (len(s.prompt_ids) + len(s.response_ids)))
            return [order[i : i + size] for i in range(0, len(order), size)]
        groups: dict[int, list[Sample]] = {}
        for s in samples:
            groups.setdefault(s.group, []).append(s)
        chunks: list[list[Sample]] = [[]]
        for members in groups.values():
            if chunks[-1] and len(chunks[-1]) + len(members) > size:
                chunks.append([])
            chunks[-1] += members
        return [c for c in chunks if c]

    def _prepare(self, chunk: Sequence[Sample]) -> tuple[Optional[PackedBatch], Batch, Counter]:
        """(the packed batch or None to run flat, the flat batch, token counts) of a micro-batch.

        Prepared once per micro-batch: the policy's and the reference's passes share it.
        """
        device = self.policy.device
        if self.packed:
            try:
                packed = pack_samples(chunk, self.pad_id, dtype=next(self.policy.parameters()).dtype,
                                      max_tokens=self.pack_limit, window=self.window,
                                      attention=self.attention, dense_up_to=self.dense_up_to).to(device)
            except PackingError as e:
                log.warning("step %d: %s; this micro-batch runs flat", self.step + 1, e)
            else:
                return packed, packed.flat, Counter(forward_tokens=packed.packed_tokens, flat_tokens=packed.flat_tokens,
                                                    block_mask_batches=int(packed.attention != "dense"))
        flat_tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in chunk)
        return None, collate(chunk, self.pad_id).to(device), Counter(
            forward_tokens=flat_tokens, flat_tokens=flat_tokens, packing_fallbacks=int(self.packed))

    def _logprobs(self, model, packed: Optional[PackedBatch], flat: Batch, with_entropy: bool = False
                  ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(log-probs [S, R], entropies [S, R] or None) in the flat layout, packed when prepared so."""
        if packed is not None:
            return packed_logprobs(model, packed, self.temperature, with_entropy)
        return response_logprobs(model, flat, self.temperature, with_entropy)

    @torch.no_grad()
    def _recompute_old(self, samples: list[Sample]) -> None:
        for chunk in self._chunks(samples):
            packed, mb, _ = self._prepare(chunk)
            logp, _ = self._logprobs(self.policy, packed, mb)  # not through DDP: no collectives
            self._note_gap(logp, mb)
            for row, s in enumerate(chunk):
                s.old_logprobs = logp[row, : len(s.response_ids)].tolist()

    def _note_gap(self, logp: torch.Tensor, mb: Batch) -> None:
        total, tokens, top = engine_gap(logp, mb)
        self._gap.update(sum=total, tokens=tokens)
        self._gap_max = max(self._gap_max, top)

    def _join_with_zero_gradient(self) -> None:
        """A forward/backward through the DDP wrapper whose loss is 0: this rank adds zeros to the
        gradient average, as a rank holding groups adds its share."""
        ids = torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.policy.device)
        out = self.model(input_ids=ids, use_cache=False, logits_to_keep=1)
        self.accelerator.backward(out.logits.sum() * 0.0)

    def _optimizer_step(self, samples: list[Sample], detach_old: bool) -> tuple[Counter, Optional[float]]:
        """Accumulate the mini-batch's gradient and step; (stats, gradient norm or None if no rank had data)."""
        cfg, acc = self.cfg, self.accelerator
        # Token-mean over the update's tokens on all ranks: each rank divides its token sum by
        # (global tokens / world size), and the gradient all-reduce averages over ranks.
        local = torch.tensor(float(sum(s.trainable_tokens for s in samples)), device=self.policy.device)
        normaliser = float(acc.reduce(local, reduction="sum")) / acc.num_processes
        stats = Counter()
        if normaliser == 0:  # no rank holds a group of this mini-batch: no update anywhere
            return stats, None
        chunks = self._chunks(samples)
        if not chunks:  # this rank holds none of this mini-batch: join the all-reduce with zeros
            self._join_with_zero_gradient()
        for i, chunk in enumerate(chunks):
            sync = i == len(chunks) - 1
            with contextlib.nullcontext() if sync else acc.no_sync(self.model):
                packed, mb, counts = self._prepare(chunk)
                logp, entropy = self._logprobs(self.model, packed, mb, with_entropy=cfg.entropy_coef > 0)
                ref = None
                if self.reference is not None:
                    with torch.no_grad():
                        ref, _ = self._logprobs(self.reference, packed, mb)
                if detach_old:  # the engine's log-probs are still in the batch: how far they sit from the policy's
                    self._note_gap(logp.detach(), mb)
                old = logp.detach() if detach_old else mb.old_logprobs
                parts = ppo_loss(logp, old, mb.advantages, mb.response_mask, normaliser,
                                 clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip,
                                 ref_logp=ref, kl_coef=cfg.kl_coef, entropy=entropy, entropy_coef=cfg.entropy_coef)
                acc.backward(parts.loss)
            stats.update(counts)
            stats.update({"loss": float(parts.loss.detach()), "pg": parts.pg, "clipped": parts.clipped,
                          "dual_clipped": parts.dual_clipped, "kl": parts.kl, "approx_kl_old": parts.approx_kl_old,
                          "tokens": parts.tokens})
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.grad_clip > 0:
            norm = float(acc.clip_grad_norm_(params, cfg.grad_clip))
        else:
            norm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        if not math.isfinite(norm):
            log.warning("step %d: gradient norm is %s; skipping this update", self.step + 1, norm)
            self.optimizer.zero_grad(set_to_none=True)
            return stats, norm
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stats, norm




def engine_gap(logp: torch.Tensor, mb: Batch) -> tuple[float, int, float]:
    """(sum, count, max) of |engine - policy| log-prob over a micro-batch's response tokens.

    logp [S, R]: the policy's log-probs; mb.old_logprobs [S, R]: still the engine's (the sampler's).
    """
    mask = mb.response_mask.bool() & torch.isfinite(mb.old_logprobs)  # [S, R]; env tokens carry no engine log-prob
    diff = (logp.float() - mb.old_logprobs.float()).abs()[mask]  # [tokens]
    if diff.numel() == 0:
        return 0.0, 0, 0.0
    return float(diff.sum()), int(diff.numel()), float(diff.max())
