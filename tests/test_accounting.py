"""Savings accounting: the structural bound against the spec's formula and against real (fake-engine) rollouts."""

from __future__ import annotations

import pytest

from fakes import FakeEngine
from treepo.rollout.accounting import bound_saving_ratio, summarize
from treepo.config import SamplerConfig
from treepo.rollout.sampler import TreeSampler


def spec_formula(b: int, d: int) -> float:
    return 1 - b * (1 - b ** -d) / ((b - 1) * d)


@pytest.mark.parametrize("b, d", [(2, 3), (2, 4), (3, 3), (2, 5)])
def test_full_tree_bound_is_the_spec_formula(b, d):
    cfg = SamplerConfig(width=b**d, depth=d, branching=b, init_divergence=b)
    assert bound_saving_ratio(cfg) == pytest.approx(spec_formula(b, d))
    assert spec_formula(2, 3) == pytest.approx(0.41667, abs=1e-5) and spec_formula(2, 4) == pytest.approx(0.53125)


def test_width_cap_and_fallback_configs():
    assert bound_saving_ratio(SamplerConfig(width=8, depth=4, branching=2)) == pytest.approx(1 - 22 / 32)
    # 2 + 4 paths reach depth 2 with 4 leaves; no answer/EOS leaves, so 2 paths restart from the prompt
    assert bound_saving_ratio(SamplerConfig(width=6, depth=2, branching=2, budget="transfer")) == pytest.approx(1 - 10 / 12)
    # particles: the root splits 6 into 3 + 3, each forks into 2 + 1 at depth 1: 2 + 4 segments for 6 x 2
    assert bound_saving_ratio(SamplerConfig(width=6, depth=2, branching=2)) == pytest.approx(1 - 6 / 12)
    assert bound_saving_ratio(SamplerConfig(width=4, depth=3, branching=1, budget="transfer")) == 0.0
    assert bound_saving_ratio(SamplerConfig(mode="independent", width=16, depth=4)) == 0.0


def test_random_fanout_bound_lies_between_its_extremes():
    lo = bound_saving_ratio(SamplerConfig(width=8, depth=4, init_divergence=8))
    hi = bound_saving_ratio(SamplerConfig(width=8, depth=4, init_divergence=2))
    mixed = bound_saving_ratio(SamplerConfig(width=8, depth=4, init_divergence=2, init_divergence_max=8))
    assert lo < mixed < hi


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(width=16, depth=4, branching=2),
        dict(width=8, depth=4, branching=2),
        dict(width=6, depth=2, branching=2),
        dict(width=12, depth=3, branching=3, init_divergence=1),
        dict(width=8, depth=5, branching=2, max_response_tokens=13),
    ],
)
def test_a_rollout_without_early_stops_saves_exactly_the_bound(kwargs):
    cfg = SamplerConfig(segment_len=3, answer_policy="none", rep_count=0, **kwargs)
    result = TreeSampler(cfg, FakeEngine()).rollout([[65, 66], [67]])
    summary = summarize([result], cfg)
    assert 1 - summary["decoded_tokens"] / summary["particle_tokens"] == pytest.approx(summary["bound_saving_ratio"], abs=1e-6)
    assert summary["estimated_saving_vs_independent"] == pytest.approx(summary["bound_saving_ratio"], abs=1e-6)
