"""The PPO loss, checked against values computed by hand (spec section 6)."""

from __future__ import annotations

import math

import pytest
import torch

from treepo.train.loss import ppo_loss


def _t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def _loss(ratio, adv, **kw):
    """One token per case: logp = log(ratio), old = 0."""
    logp = torch.log(_t(ratio)).requires_grad_()
    parts = ppo_loss(logp, torch.zeros_like(logp), _t(adv), torch.ones_like(logp, dtype=torch.bool), 1.0, **kw)
    return parts, logp


@pytest.mark.parametrize(
    "ratio, adv, expect, clipped",
    [
        (1.0, 2.0, -2.0, False),  # on-policy: -A
        (1.5, 2.0, -2.0 * 1.28, True),  # A > 0, ratio above 1 + eps_high: capped at 1.28
        (1.2, 2.0, -2.0 * 1.2, False),  # inside the clip-higher range (1.2 < 1.28)
        (0.5, 2.0, -2.0 * 0.5, False),  # A > 0, ratio low: the unclipped (smaller) objective is kept
        (0.5, -2.0, 2.0 * 0.8, True),  # A < 0, ratio below 1 - eps_low: clipped at 0.8
        (1.5, -2.0, 2.0 * 1.5, False),  # A < 0, ratio high: unclipped, below the dual bound
        (20.0, -2.0, 2.0 * 10.0, False),  # A < 0, ratio above c = 10: dual clip bounds it at -A c
    ],
)
def test_single_token_cases(ratio, adv, expect, clipped):
    parts, _ = _loss([ratio], [adv])
    assert parts.loss.item() == pytest.approx(expect, rel=1e-5)
    assert parts.clipped == (1.0 if clipped else 0.0)


def test_dual_clip_counts_and_zero_gradient():
    parts, logp = _loss([20.0], [-2.0])
    assert parts.dual_clipped == 1.0
    parts.loss.backward()
    assert logp.grad.abs().item() == 0.0  # a constant bound passes no gradient


def test_dual_clip_off():
    parts, _ = _loss([20.0], [-2.0], dual_clip=0.0)
    assert parts.loss.item() == pytest.approx(40.0)


def test_gradient_of_unclipped_token_is_minus_a_times_ratio():
    parts, logp = _loss([1.1], [3.0])
    parts.loss.backward()
    assert logp.grad.item() == pytest.approx(-3.0 * 1.1, rel=1e-5)  # d(-A e^logp)/dlogp


def test_token_mean_over_the_normaliser_ignores_padding():
    logp = torch.zeros(2, 3)
    adv = _t([1.0, 2.0, 100.0], [3.0, 100.0, 100.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    parts = ppo_loss(logp, logp.clone(), adv, mask, normaliser=3.0)
    assert parts.loss.item() == pytest.approx(-(1 + 2 + 3) / 3)
    assert parts.tokens == 3.0
    # two micro-batches with the batch's normaliser sum to the batch token-mean
    a = ppo_loss(logp[:1], logp[:1], adv[:1], mask[:1], normaliser=3.0)
    b = ppo_loss(logp[1:], logp[1:], adv[1:], mask[1:], normaliser=3.0)
    assert float(a.loss + b.loss) == pytest.approx(parts.loss.item())


def test_k3_kl_to_reference():
    logp = torch.log(_t([0.5]))
    ref = torch.log(_t([0.25]))
    parts = ppo_loss(logp, logp.clone(), _t([0.0]), torch.ones(1, 1, dtype=torch.bool), 1.0,
                     ref_logp=ref, kl_coef=0.1)
    d = math.log(0.25) - math.log(0.5)
    k3 = math.exp(d) - d - 1
    assert parts.kl == pytest.approx(k3, rel=1e-5)
    assert parts.loss.item() == pytest.approx(0.1 * k3, rel=1e-5)
    with pytest.raises(ValueError, match="ref_logp"):
        ppo_loss(logp, logp, _t([0.0]), torch.ones(1, 1, dtype=torch.bool), 1.0, kl_coef=0.1)


def test_entropy_bonus_lowers_the_loss():
    logp = torch.zeros(1, 2)
    ent = _t([1.0, 3.0])
    mask = torch.ones(1, 2, dtype=torch.bool)
    parts = ppo_loss(logp, logp, torch.zeros(1, 2), mask, 2.0, entropy=ent, entropy_coef=0.5)
    assert parts.loss.item() == pytest.approx(-0.5 * (1 + 3) / 2)
    assert parts.entropy == pytest.approx(4.0)


def test_approx_kl_old_is_old_minus_new():
    logp = _t([-1.0, -2.0])
    old = _t([-1.5, -1.0])
    parts = ppo_loss(logp, old, torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), 1.0)
    assert parts.approx_kl_old == pytest.approx((-1.5 + 1.0) + (-1.0 + 2.0))
