"""Training-side forward passes: trajectories -> padded batch -> per-token log-probs of the policy.

A batch puts every prompt left-padded to the same width P and every response right-padded to
the same length R, so all responses start at column P and one `logits_to_keep=R+1` keeps only
the logits that predict response tokens (the prompt's logits are never materialised):

    input_ids        [B, P + R]   pad | prompt | response | pad
    attention_mask   [B, P + R]   1 on prompt and response tokens
    position_ids     [B, P + R]   0.. along each row's real tokens (left padding shifts nothing)
    response_mask    [B, R]       1 on response tokens the loss trains (a sample's loss_mask: not env turns)
    logits kept      [B, R + 1, V] -> [B, R, V] (the last column predicts past the end)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch


@dataclass
class Sample:
    """One trajectory, ready for the loss."""

    prompt_ids: list[int]
    response_ids: list[int]
    advantages: list[float]  # one per response token (before whitening)
    old_logprobs: list[float]  # the sampler's, one per response token
    group: int = 0  # prompt index in the step
    meta: dict = field(default_factory=dict)
    loss_mask: Optional[list[bool]] = None  # per response token; False = context only (env turns); None = all trained

    @property
    def trainable_tokens(self) -> int:
        """Response tokens the loss sees (environment tokens excluded)."""
        return len(self.response_ids) if self.loss_mask is None else sum(map(bool, self.loss_mask))


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, P + R]
    attention_mask: torch.Tensor  # [B, P + R]
    position_ids: torch.Tensor  # [B, P + R]
    response_ids: torch.Tensor  # [B, R]
    response_mask: torch.Tensor  # [B, R] bool: trained response tokens (padding and env tokens are False)
    advantages: torch.Tensor  # [B, R]
    old_logprobs: torch.Tensor  # [B, R]

    @property
    def response_len(self) -> int:
        return self.response_ids.shape[1]

    def to(self, device) -> "Batch":
        return Batch(**{k: v.to(device) for k, v in self.__dict__.items()})


def collate(samples: Sequence[Sample], pad_id: int) -> Batch:
    """Pad a list of samples into one batch (shapes in the module docstring)."""
    P = max(len(s.prompt_ids) for s in samples)
    R = max(max(len(s.response_ids) for s in samples), 1)
    B = len(samples)
    ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + R), dtype=torch.long)
    resp_mask = torch.zeros((B, R), dtype=torch.bool)
    adv = torch.zeros((B, R), dtype=torch.float32)
    old = torch.zeros((B, R), dtype=torch.float32)
    for b, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        if len(s.advantages) != r or len(s.old_logprobs) != r or (s.loss_mask is not None and len(s.loss_mask) != r):
            raise ValueError(f"sample {b}: {r} response tokens but {len(s.advantages)} advantages / "
                             f"{len(s.old_logprobs)} log-probs / "
                             f"{'no' if s.loss_mask is None else len(s.loss_mask)} loss-mask entries.")
        ids[b, P - p : P] = torch.tensor(s.prompt_ids)
        ids[b, P : P + r] = torch.tensor(s.response_ids, dtype=torch.long)
        attn[b, P - p : P + r] = 1
        resp_mask[b, :r] = True if s.loss_mask is None else torch.tensor(s.loss_mask, dtype=torch.bool)
        adv[b, :r] = torch.tensor(s.advantages)
        old[b, :r] = torch.tensor(s.old_logprobs)
    position_ids = (attn.cumsum(-1) - 1).clamp_min(0)
    return Batch(ids, attn, position_ids, ids[:, P:], resp_mask, adv, old)


def response_logprobs(
    model, batch: Batch, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(log-probs [B, R] of the response tokens, entropies [B, R] or None) under `model`.

    Logits are divided by the sampling temperature, so the log-probs are those of the
    distribution the engine sampled from (before top-p/top-k truncation), as the engine reports.
    """
    R = batch.response_len
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        logits_to_keep=R + 1,
    )
    logits = out.logits[:, -(R + 1) : -1, :]  # [B, R, V]: column t predicts response token t
    logits, lse, entropy = token_distribution(logits, temperature, with_entropy)
    picked = logits.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)  # [B, R]
    return picked - lse, entropy


def token_distribution(logits: torch.Tensor, temperature: float, with_entropy: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(float logits / T, their logsumexp, their entropy or None) over the last axis.

    logits [..., V] -> [..., V], [...], [...]. Log-probs are the chosen logit minus the logsumexp
    (no [..., V] log-softmax kept for the backward pass); the entropy needs the full
    log-softmax, so it is built only when the entropy bonus asks for it.
    """
    logits = logits.float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    entropy = None
    if with_entropy:
        logsm = torch.log_softmax(logits, dim=-1)
        entropy = -(logsm.exp() * logsm).sum(-1)
    return logits, lse, entropy
