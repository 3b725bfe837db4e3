"""Advantage estimators: pure functions over a prompt's leaf ids and rewards.

A trajectory is named by its leaf id, the tuple of child indices from the root, so the
trajectories under its ancestor at depth j are exactly the leaves whose ids share its first j
elements. Every estimator here takes `leaves` (ids) and `rewards` (one float per leaf, same
order) and returns per-token advantages through `token_advantages`, which the loss consumes.

- `tree_advantage`, aggregate 'average' (the paper's Eq. 5, default): for each level
  j = 0 .. depth-1, a_ij = R_i - mean(R over G_j(i)); level 0 (the whole prompt group) always,
  deeper levels only when their group has more than one member; the used terms are averaged.
- aggregate 'size_weighted' (Eq. 6): sum_j |G_j| a_ij / sum_j |G_j| over the same terms.
- `segment_advantages`: per segment, V(node_k) - V(node_{k-1}), V = mean reward of the leaves
  under a node; a shared segment gets one value whichever descendant carries it.
- `grpo_advantage`: (R - mean) / (std + eps) over the prompt group.
- 'unbiased' (`unbiased.py`): leave-one-out segment values with leaf weights, whose weighted policy
  gradient is unbiased for the policy's (the derivation is in that module).
- `whiten` ('token'): (x - mean) / sqrt(var + 1e-8) over every valid token of the batch; it re-centres,
  and with longer wrong answers the token-weighted mean is negative, so some wrong answers end up
  with a positive advantage. `scale` ('scale': divide by the same std, no re-centring) never changes
  a sign; `center_groups` ('group': centre each prompt group, then scale) keeps the batch-wide scale.

Particles (the default budget): a leaf stands for `multiplicity` particles, each an exact draw from the
policy. Every estimator then reads the group as its width particles: means, standard deviations and
subgroup sizes count each leaf `multiplicity` times, and `token_advantages` weighs each leaf's
advantages by multiplicity x leaves / width (mean 1), as if its copies were trained on one by one.
Without multiplicities (the 'transfer' / 'branch' budgets) every leaf counts once, as before.

Worked example (paper Fig. 3), leaf c22 with rewards a=-1, b=+1, c11=-1, c12=-1, c21=+1,
c22=+1, c23=-1, c3=-1: terms +1.25 (root), +1.333 (node c), +0.667 (node c2), average 1.083.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence, get_args

import torch

from ..config import Estimator, Whitening
from ..tree import NodeId
from .unbiased import unbiased_advantages

ESTIMATORS: tuple[str, ...] = get_args(Estimator)  # the names come from the config's Literal
WHITENINGS: tuple[str, ...] = get_args(Whitening)


def _check(leaves: Sequence[NodeId], rewards: Sequence[float]) -> None:
    if len(leaves) != len(rewards):
        raise ValueError(f"{len(leaves)} leaves but {len(rewards)} rewards: give one reward per leaf.")
    if len(set(leaves)) != len(leaves):
        raise ValueError("leaf ids repeat: every trajectory must end at its own node.")
    if any(len(leaf) == 0 for leaf in leaves):
        raise ValueError("a leaf id is empty (the root): every trajectory has at least one segment.")


def _counts(leaves: Sequence[NodeId], multiplicity: Optional[Sequence[int]]) -> list[int]:
    if multiplicity is None:
        return [1] * len(leaves)
    if len(multiplicity) != len(leaves) or any(int(m) < 1 for m in multiplicity):
        raise ValueError(f"multiplicity {list(multiplicity)}: give one count >= 1 per leaf ({len(leaves)} leaves).")
    return [int(m) for m in multiplicity]


def subtree_means(leaves: Sequence[NodeId], rewards: Sequence[float], multiplicity: Optional[Sequence[int]] = None
                  ) -> dict[NodeId, tuple[float, int]]:
    """(mean reward, size) of the trajectories under every node that has a leaf below it, root () included;
    a leaf counts `multiplicity` times (once without)."""
    sums: dict[NodeId, float] = {}
    counts: dict[NodeId, int] = {}
    for leaf, r, m in zip(leaves, rewards, _counts(leaves, multiplicity)):
        for k in range(len(leaf) + 1):
            prefix = leaf[:k]
            sums[prefix] = sums.get(prefix, 0.0) + m * float(r)
            counts[prefix] = counts.get(prefix, 0) + m
    return {node: (sums[node] / counts[node], counts[node]) for node in sums}


def tree_advantage(
    leaves: Sequence[NodeId], rewards: Sequence[float], aggregate: Literal["average", "size_weighted"] = "average",
    multiplicity: Optional[Sequence[int]] = None,
) -> list[float]:
    """One scalar advantage per leaf: Eq. 5 ('average') or Eq. 6 ('size_weighted')."""
    _check(leaves, rewards)
    groups = subtree_means(leaves, rewards, multiplicity)
    out = []
    for leaf, r in zip(leaves, rewards):
        terms: list[tuple[float, int]] = []  # (a_ij, |G_j|)
        for j in range(len(leaf)):  # ancestors at depth 0 .. depth-1; the leaf itself is not a group
            mean, size = groups[leaf[:j]]
            if j == 0 or size > 1:
                terms.append((float(r) - mean, size))
        if aggregate == "average":
            out.append(sum(a for a, _ in terms) / len(terms))
        elif aggregate == "size_weighted":
            out.append(sum(a * n for a, n in terms) / sum(n for _, n in terms))
        else:
            raise ValueError(f"aggregate={aggregate!r}: use 'average' or 'size_weighted'.")
    return out


def grpo_advantage(rewards: Sequence[float], eps: float = 1e-4, multiplicity: Optional[Sequence[int]] = None
                   ) -> list[float]:
    """GRPO: (R - mean) / (std + eps) over the prompt group; std is the sample std (n - 1), as TRL computes it.
    With multiplicities the group is the particles: each reward counts `multiplicity` times."""
    r = torch.tensor([float(x) for x in rewards], dtype=torch.float64)
    m = torch.tensor(_counts(rewards, multiplicity), dtype=torch.float64)
    n = m.sum()
    mean = (m * r).sum() / n
    std = ((m * (r - mean) ** 2).sum() / (n - 1)).sqrt() if n > 1 else torch.tensor(0.0, dtype=torch.float64)
    return ((r - mean) / (std + eps)).tolist()


def segment_advantages(leaves: Sequence[NodeId], rewards: Sequence[float],
                       multiplicity: Optional[Sequence[int]] = None) -> list[list[float]]:
    """Per leaf, one advantage per segment on its path: V(node_k) - V(node_{k-1}), V(root) = group mean.

    The values along a path telescope to R_i - mean(R): the same total credit as level-0
    centring, assigned to the segments where the expected reward changed.
    """
    _check(leaves, rewards)
    groups = subtree_means(leaves, rewards, multiplicity)
    return [[groups[leaf[:k]][0] - groups[leaf[: k - 1]][0] for k in range(1, len(leaf) + 1)] for leaf in leaves]


def token_advantages(
    estimator: Estimator,
    leaves: Sequence[NodeId],
    rewards: Sequence[float],
    segment_lengths: Sequence[Sequence[int]],
    multiplicity: Optional[Sequence[int]] = None,
) -> list[list[float]]:
    """Per leaf, one advantage per response token.

    segment_lengths[i] lists the token count of each segment on leaf i's path (root side first);
    scalar estimators broadcast to every token, 'segment' gives each segment's tokens its value.
    With multiplicities every leaf's advantages are weighed by multiplicity x leaves / width (the
    'unbiased' estimator folds the same factor in through its leaf weights).
    """
    if estimator == "unbiased":
        per_segment = unbiased_advantages(leaves, rewards, multiplicity)
    elif estimator == "segment":
        per_segment = segment_advantages(leaves, rewards, multiplicity)
    elif estimator == "grpo":
        per_segment = [[a] for a in grpo_advantage(rewards, multiplicity=multiplicity)]
    elif estimator in ("average", "size_weighted"):
        per_segment = [[a] for a in tree_advantage(leaves, rewards, estimator, multiplicity)]
    else:
        raise ValueError(f"advantage estimator {estimator!r}: use one of {', '.join(ESTIMATORS)}.")
    if multiplicity is not None and estimator != "unbiased":
        counts = _counts(leaves, multiplicity)
        per_segment = [[a * m * len(leaves) / sum(counts) for a in values] for values, m in zip(per_segment, counts)]
    out = []
    for values, lengths in zip(per_segment, segment_lengths):
        if len(values) == 1:  # a scalar: every token of the path
            out.append(values * sum(lengths))
        else:
            out.append([a for a, n in zip(values, lengths) for _ in range(n)])
    return out


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, *, mean: Optional[float] = None,
           var: Optional[float] = None, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the tokens where mask is true; masked-out entries become 0.

    values, mask: [B, T] (or any shape, the same for both). Population variance, no per-group std.
    `mean` and `var` may be given (e.g. over the tokens of all ranks); by default they are the
    masked tokens'. `weight` (same shape) counts a token that many times in the moments (a particle
    leaf's tokens count once per particle).
    """
    keep = mask.to(values.dtype)
    m = keep * weight.to(values.dtype) if weight is not None else keep  # [same] each token's count in the moments
    n = m.sum().clamp_min(1.0)
    if mean is None:
        mean = (values * m).sum() / n
    if var is None:
        var = (m * (values - mean) ** 2).sum() / n
    return (values - mean) * torch.rsqrt(torch.as_tensor(var + eps, dtype=values.dtype)) * keep


def scale(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, *, var: Optional[float] = None,
          weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x / sqrt(var + eps) over the tokens where mask is true (masked-out entries 0): no re-centring, so no
    advantage changes sign. `var` (the masked tokens' population variance by default, each token counted
    `weight` times) may be given."""
    keep = mask.to(values.dtype)
    if var is None:
        m = keep * weight.to(values.dtype) if weight is not None else keep
        n = m.sum().clamp_min(1.0)
        mean = (values * m).sum() / n
        var = (m * (values - mean) ** 2).sum() / n
    return values * torch.rsqrt(torch.as_tensor(var + eps, dtype=values.dtype)) * keep


def center_groups(values: torch.Tensor, mask: torch.Tensor, groups: torch.Tensor,
                  weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each group's masked tokens minus that group's token mean (masked-out entries 0). values, mask, groups: [N].
    `weight` [N] counts a token that many times in its group's mean."""
    keep = mask.to(values.dtype)
    m = keep * weight.to(values.dtype) if weight is not None else keep  # [N] each token's count in its group's mean
    out = torch.zeros_like(values)
    for g in torch.unique(groups):
        in_g = (groups == g).to(values.dtype)
        mean = (values * in_g * m).sum() / (in_g * m).sum().clamp_min(1.0)
        out += (values - mean) * in_g * keep
    return out
