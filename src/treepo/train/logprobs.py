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
    B, R = batch.response_ids.shape
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    # kept column t (of the last R + 1) predicts response token t
    index = (torch.arange(B, device=batch.input_ids.device)[:, None].expand(B, R),
             torch.arange(R, device=batch.input_ids.device)[None, :].expand(B, R))
    return token_logprobs(model, inputs, R + 1, index, batch.response_ids, temperature, with_entropy)


# ---------------------------------------------------------------------------------------------
# From the model's output layer to per-token log-probs, whole or in chunks
# ---------------------------------------------------------------------------------------------

BIG_LOGITS = 2**28  # kept positions x vocabulary above which the output layer runs in chunks (1 GiB of float32)
HEAD_CHUNK = 1024  # positions per chunk


def token_logprobs(model, inputs: dict, keep, index: tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor,
                   temperature: float = 1.0, with_entropy: bool = False
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(log-probs [S, R] of `targets`, entropies [S, R] or None), each predicted at kept position
    (index[0][s, r], index[1][s, r]) of the model's output on `inputs`.

    keep    `logits_to_keep`: an int (the last `keep` columns) or a [K] tensor of columns
    index   rows [S, R] and kept columns [S, R]
    targets [S, R] token ids

    When the kept logits [B, K, V] would pass BIG_LOGITS elements and the model's output layer is a
    plain linear map of its base model's last hidden states (`chunkable_head`), the logits are never
    held whole: the log-sum-exp (and entropy) run over chunks of HEAD_CHUNK positions, each
    recomputed in the backward pass, and a target's logit is its hidden state times its output
    row. Memory for the head then grows with the positions times the hidden size, not the vocabulary.
    """
    rows, cols = index
    B = inputs["input_ids"].shape[0]
    K = keep if isinstance(keep, int) else len(keep)
    head = chunkable_head(model)
    if head is None or B * K * head.weight.shape[0] <= BIG_LOGITS:
        out = model(**inputs, use_cache=False, logits_to_keep=keep)
        logits = out.logits[:, -keep:] if isinstance(keep, int) else out.logits  # [B, K, V]
        logits, lse, ent = token_distribution(logits, temperature, with_entropy)  # [B, K, V], [B, K], [B, K]
        logp = logits[rows, cols, targets] - lse[rows, cols]  # [S, R]
        return logp, (ent[rows, cols] if ent is not None else None)
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state  # [B, L, H]
    hidden = hidden[:, -keep:] if isinstance(keep, int) else hidden[:, keep]  # [B, K, H]

    def stats(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [B, c, H] -> lse [B, c], entropy [B, c]
        _, lse, ent = token_distribution(torch.nn.functional.linear(h, head.weight, head.bias), temperature,
                                         with_entropy)
        return lse, (ent if ent is not None else torch.zeros_like(lse))

    from torch.utils.checkpoint import checkpoint

    parts = [checkpoint(stats, hidden[:, i: i + HEAD_CHUNK], use_reentrant=False) for i in range(0, K, HEAD_CHUNK)]
    lse = torch.cat([p[0] for p in parts], dim=1)  # [B, K]
    picked = (hidden[rows, cols].float() * head.weight[targets].float()).sum(-1)  # [S, R]: h . w_target
    if head.bias is not None:
        picked = picked + head.bias[targets].float()
    if temperature > 0 and temperature != 1.0:
        picked = picked / temperature
    ent = torch.cat([p[1] for p in parts], dim=1)[rows, cols] if with_entropy else None
    return picked - lse[rows, cols], ent


POST_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def chunkable_head(model) -> Optional[torch.nn.Linear]:
    """The output layer when the logits are exactly `head(base_model(...).last_hidden_state)`, else None:
    not through a DDP wrapper (its forward must run), not for configs that scale or cap logits after it."""
    if hasattr(model, "module") or not hasattr(model, "get_output_embeddings"):
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) is not None for name in POST_HEAD):
        return None
    head = model.get_output_embeddings()
    base = getattr(model, "base_model", None)
    if not isinstance(head, torch.nn.Linear) or base is None or base is model:
        return None
    return head


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
