"""The sampler's pure decisions, tested without any engine: branching counts, splits, fallback
plans, path scores, schedules, and config validation. Hand-computed expectations throughout."""

from __future__ import annotations

import random

import pytest

from treepo.config import SamplerConfig
from treepo.errors import ConfigError
from treepo.rollout.branching import (
    children_total,
    divergence_temperature,
    largest_remainder,
    path_score,
    plan_fallback,
    split_children,
)
from treepo.tree import Node, PromptTree


def test_children_total_formula():
    assert children_total(active=4, finished_now=0, remaining=16, branching=2) == 8
    assert children_total(active=4, finished_now=2, remaining=16, branching=2) == 12
    assert children_total(active=4, finished_now=2, remaining=6, branching=2) == 6
    assert children_total(active=5, finished_now=0, remaining=5, branching=2) == 5  # never fewer than A


def test_largest_remainder_hand_computed():
    # quotas 5*[0.5, 0.3, 0.2] = [2.5, 1.5, 1.0] -> floors [2, 1, 1], one left to the largest remainder (tie: index 0)
    assert largest_remainder(5, [0.5, 0.3, 0.2]) == [3, 1, 1]
    assert largest_remainder(4, [1, 1, 1]) == [2, 1, 1]
    assert largest_remainder(0, [1, 2]) == [0, 0]


def test_probability_policies_favour_the_right_paths():
    rng = random.Random(0)
    scores_lowprob = [1.0, -1.0]  # low_prob policy uses score = -mean logprob: path 0 is less likely
    cfg = SamplerConfig(budget="transfer", divergence_policy="low_prob")
    # T=0.5: weights e^0=1, e^-4=0.018 -> 6 extra children: quotas [5.89, 0.11] -> [6, 0] -> +1 each
    assert split_children(8, scores_lowprob, cfg, rng, temperature=0.5) == [7, 1]
    # softmax(2/T=1): weights e^0=1, e^-2: extra 6 -> quotas [5.28, 0.71] -> [5, 1] +1 each
    assert split_children(8, [1.0, -1.0], SamplerConfig(budget="transfer", divergence_policy="high_prob"), rng, temperature=1.0) == [6, 2]
    counts = split_children(7, [0.0, 0.0, 0.0], SamplerConfig(budget="transfer", divergence_policy="fixed_avg"), rng, 1.0)
    assert sorted(counts) == [2, 2, 3]


def test_divergence_temperature_cosine_schedule():
    cfg = SamplerConfig(budget="transfer", divergence_temperature=2.0, divergence_temperature_end=0.5)
    assert divergence_temperature(cfg, 0.0) == pytest.approx(2.0)
    assert divergence_temperature(cfg, 0.5) == pytest.approx(1.25)
    assert divergence_temperature(cfg, 1.0) == pytest.approx(0.5)
    assert divergence_temperature(SamplerConfig(budget="transfer"), 0.7) == 1.0


def test_plan_fallback_is_pure_and_respects_backtrack_limit():
    cfg = SamplerConfig(budget="transfer", width=8, depth=4, segment_len=2, branching=2, fallback_max_backtrack=1)
    tree = PromptTree(prompt_index=0, prompt_ids=[65])
    for nid in [(0,), (0, 0), (0, 0, 0)]:
        tree.nodes[nid] = Node(nid, [66], [-0.1], [0.1], text="b")
    tree.nodes[(0, 0, 0)].finish_reason = "eos"
    tree.leaves = [(0, 0, 0)]
    planned = plan_fallback(tree, 5, cfg, random.Random(0))
    assert planned == [(0, 0, 1), (0, 0, 2), (0, 0, 3), (0, 0, 4), (0, 0, 5)]
    root_cfg = SamplerConfig(budget="transfer", width=8, depth=4, branching=2, fallback_policy="root")
    assert plan_fallback(tree, 3, root_cfg, random.Random(0)) == [(1,), (2,), (3,)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"width": 0}, "width=0: must be an integer >= 1"),
        ({"depth": 0}, "depth=0"),
        ({"segment_len": 0}, "segment_len=0"),
        ({"branching": 0}, "branching=0"),
        ({"init_divergence": 5, "init_divergence_max": 3}, "reversed"),
        ({"width": 4, "init_divergence": 2, "init_divergence_max": 8}, "init_divergence_max=8 exceeds width=4"),
        ({"width": 4, "init_divergence": 6}, "init_divergence=6 exceeds width=4"),
        ({"rep_count": 1}, "rep_count=1"),
        ({"answer_predicate": "nocolon"}, "module:function"),
        ({"fallback_max_backtrack": -1}, "fallback_max_backtrack=-1"),
        ({"divergence_temperature": 0.0}, "divergence_temperature=0.0"),
        ({"divergence_temperature_end": -1.0}, "divergence_temperature_end=-1.0"),
    ],
)
def test_bad_sampler_config_names_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SamplerConfig(budget="transfer", **kwargs)


def test_finished_policy_reopens_only_answer_or_eos_paths():
    cfg = SamplerConfig(budget="transfer", width=8, depth=4, branching=2, fallback_policy="finished")
    tree = PromptTree(prompt_index=0, prompt_ids=[65])
    for nid, reason in [((0,), None), ((0, 0), "depth"), ((1,), None), ((1, 0), "eos")]:
        tree.nodes[nid] = Node(nid, [66], [-0.1], [0.1], finish_reason=reason)
    tree.leaves = [(0, 0), (1, 0)]
    under_depth_leaf = lambda plan: any(len(p) >= 2 and p[0] == 0 for p in plan)  # noqa: E731
    for seed in range(20):  # 'finished' never reopens the depth-finished path (0, 0)
        assert not under_depth_leaf(plan_fallback(tree, 6, cfg, random.Random(seed)))
    any_cfg = SamplerConfig(budget="transfer", width=8, depth=4, branching=2, fallback_policy="any")
    assert any(under_depth_leaf(plan_fallback(tree, 6, any_cfg, random.Random(seed))) for seed in range(20))


def test_path_scores_use_the_configured_statistic():
    tree = PromptTree(prompt_index=0, prompt_ids=[65])
    tree.nodes[(0,)] = Node((0,), [1, 2], [-1.0, -3.0], [0.5, 1.5])
    tree.nodes[(0, 0)] = Node((0, 0), [3], [-2.0], [4.0])
    node = tree.nodes[(0, 0)]
    assert path_score(tree, node, SamplerConfig(budget="transfer", divergence_policy="high_prob", divergence_score="last_mean")) == -2.0
    assert path_score(tree, node, SamplerConfig(budget="transfer", divergence_policy="high_prob", divergence_score="path_mean")) == -2.0
    assert path_score(tree, node, SamplerConfig(budget="transfer", divergence_policy="high_prob", divergence_score="path_sum")) == -6.0
    assert path_score(tree, node, SamplerConfig(budget="transfer", divergence_policy="low_prob", divergence_score="path_sum")) == 6.0
    assert path_score(tree, node, SamplerConfig(budget="transfer", divergence_policy="entropy")) == 4.0
