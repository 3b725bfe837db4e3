"""The TreePO policy loss: PPO clip with clip-higher and dual clip, token-mean.

Per response token t with ratio r = exp(logp - old_logp) and advantage A:

    pg   = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))        (clip-higher: eps_high > eps_low)
    pg   = min(pg, -A c)            where A < 0                     (dual clip, c = dual_clip > 1)
    kl   = exp(ref - logp) - (ref - logp) - 1                       (k3 estimator, optional)
    loss = sum_t mask * (pg + kl_coef kl - entropy_coef H) / normaliser

`normaliser` is the number of valid tokens in the whole batch (all micro-batches, all ranks),
so summing micro-batch losses gives exactly the token-mean over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class LossParts:
    """Sums over the micro-batch's valid tokens (divide by the token count to report means)."""

    loss: torch.Tensor  # scalar, differentiable, already divided by the normaliser
    pg: float
    clipped: float  # tokens where the clipped branch set the value (its gradient is zero)
    dual_clipped: float  # tokens where the dual clip set the value
    kl: float
    entropy: float
    approx_kl_old: float  # sum of (old - logp): how far the policy moved from the sampler
    tokens: float


def ppo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    normaliser: float,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float = 10.0,
    ref_logp: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    entropy: Optional[torch.Tensor] = None,
    entropy_coef: float = 0.0,
) -> LossParts:
    """All tensors [B, T] over response tokens; mask is 1 on real tokens, 0 on padding.

    dual_clip <= 1 turns the dual clip off. ref_logp is needed when kl_coef > 0, entropy when
    entropy_coef > 0 (the full-distribution entropy per token, differentiable).
    """
    m = mask.to(logp.dtype)  # [B, T]
    log_ratio = logp - old_logp  # [B, T]
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio  # [B, T]
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped
    dual = torch.zeros_like(was_clipped)
    if dual_clip > 1.0:
        cap = -advantages * dual_clip  # only binds where A < 0 (then -A c > 0 bounds a huge ratio)
        dual = (advantages < 0) & (pg > cap)
        pg = torch.where(advantages < 0, torch.minimum(pg, cap), pg)
    total = pg * m

    kl_sum = 0.0
    if kl_coef > 0:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs ref_logp, the frozen reference model's log-probs.")
        d = ref_logp - logp  # [B, T]
        kl = torch.exp(d) - d - 1.0
        total = total + kl_coef * kl * m
        kl_sum = float((kl * m).sum().detach())
    ent_sum = 0.0
    if entropy is not None:
        ent_sum = float((entropy * m).sum().detach())
        if entropy_coef > 0:
            total = total - entropy_coef * entropy * m
    elif entropy_coef > 0:
        raise ValueError("entropy_coef > 0 needs the per-token entropy.")

    loss = total.sum() / normaliser  # scalar, keeps the graph
    with torch.no_grad():
        return LossParts(
            loss=loss,
            pg=float((pg * m).sum()),
            clipped=float(((was_clipped & ~dual) * m).sum()),
            dual_clipped=float((dual * m).sum()),
            kl=kl_sum,
            entropy=ent_sum,
            approx_kl_old=float((-log_ratio * m).sum()),
            tokens=float(m.sum()),
        )
