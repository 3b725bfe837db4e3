"""Advantage estimators, checked by hand (spec section 5)."""

from __future__ import annotations

import math

import pytest
import torch

from treepo.train.advantages import grpo_advantage, segment_advantages, token_advantages, tree_advantage, whiten

# The paper's Fig. 3 tree: root -> a, b, c; c -> c1, c2, c3; c1 -> c11, c12; c2 -> c21, c22, c23.
FIG3 = {
    "a": ((0,), -1.0),
    "b": ((1,), 1.0),
    "c11": ((2, 0, 0), -1.0),
    "c12": ((2, 0, 1), -1.0),
    "c21": ((2, 1, 0), 1.0),
    "c22": ((2, 1, 1), 1.0),
    "c23": ((2, 1, 2), -1.0),
    "c3": ((2, 2), -1.0),
}
NAMES = list(FIG3)
LEAVES = [FIG3[n][0] for n in NAMES]
REWARDS = [FIG3[n][1] for n in NAMES]


def test_fig3_leaf_c22_is_1_083_before_whitening():
    adv = dict(zip(NAMES, tree_advantage(LEAVES, REWARDS, "average")))
    # root mean -0.25 -> +1.25; node c mean -1/3 -> +4/3; node c2 mean 1/3 -> +2/3
    assert adv["c22"] == pytest.approx((1.25 + 4 / 3 + 2 / 3) / 3)
    assert adv["c22"] == pytest.approx(1.0833, abs=1e-4)


def test_fig3_other_leaves_by_hand():
    adv = dict(zip(NAMES, tree_advantage(LEAVES, REWARDS, "average")))
    assert adv["a"] == pytest.approx(-1 + 0.25)  # depth 1: only the root group
    # c3 (depth 2): root -0.75, node c (-1 + 1/3) = -2/3; its own group c3 has 1 member and is not a level
    assert adv["c3"] == pytest.approx((-0.75 - 2 / 3) / 2)
    # c11: root -0.75, node c -2/3, node c1 (mean -1) 0
    assert adv["c11"] == pytest.approx((-0.75 - 2 / 3 + 0.0) / 3)


def test_size_weighted_is_eq6():
    adv = dict(zip(NAMES, tree_advantage(LEAVES, REWARDS, "size_weighted")))
    assert adv["c22"] == pytest.approx((8 * 1.25 + 6 * 4 / 3 + 3 * 2 / 3) / (8 + 6 + 3))
    assert adv["c3"] == pytest.approx((8 * -0.75 + 6 * -2 / 3) / 14)


def test_depth_one_tree_is_group_mean_centering():
    leaves = [(i,) for i in range(5)]
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0]
    for agg in ("average", "size_weighted"):
        assert tree_advantage(leaves, rewards, agg) == pytest.approx([r - 0.6 for r in rewards])


def test_depth_zero_group_is_the_whole_prompt_group_not_a_string_prefix():
    # ids (1,) and (1, 1) would collide if joined as strings "1" / "11"; the level-0 group is all leaves
    leaves = [(1,), (11,), (1, 1)]
    rewards = [1.0, -1.0, -1.0]
    adv = tree_advantage(leaves, rewards)
    mean = -1 / 3
    assert adv[1] == pytest.approx(-1 - mean)  # (11,) sees only the root group
    assert adv[0] == pytest.approx(1 - mean)


def test_zero_variance_subgroups_are_kept():
    # both children of node (0,) scored 1: their subgroup term is 0 but still averaged in
    leaves = [(0, 0), (0, 1), (1, 0)]
    rewards = [1.0, 1.0, -1.0]
    adv = tree_advantage(leaves, rewards)
    assert adv[0] == pytest.approx(((1 - 1 / 3) + 0.0) / 2)


def test_segment_estimator_same_value_for_a_shared_segment():
    per_leaf = segment_advantages(LEAVES, REWARDS)
    by_name = dict(zip(NAMES, per_leaf))
    # node c is shared by c11, c12, c21, c22, c23, c3: V(c) - V(root) = -1/3 + 1/4
    for name in ("c11", "c12", "c21", "c22", "c23", "c3"):
        assert by_name[name][0] == pytest.approx(-1 / 3 + 0.25)
    # node c2 shared by c21, c22, c23: V(c2) - V(c) = 1/3 + 1/3
    for name in ("c21", "c22", "c23"):
        assert by_name[name][1] == pytest.approx(2 / 3)
    # telescoping: the segments of a path sum to R - mean
    for name, values in by_name.items():
        assert sum(values) == pytest.approx(FIG3[name][1] + 0.25)


def test_grpo_mean_and_sample_std():
    rewards = [1.0, 0.0, 0.0, 0.0]
    std = math.sqrt(((0.75**2) + 3 * 0.25**2) / 3)
    assert grpo_advantage(rewards) == pytest.approx([(r - 0.25) / (std + 1e-4) for r in rewards])
    assert grpo_advantage([1.0, 1.0]) == pytest.approx([0.0, 0.0])


def test_token_advantages_broadcast_and_segments():
    leaves = [(0, 0), (0, 1)]
    rewards = [1.0, -1.0]
    lengths = [[2, 3], [2, 1]]
    scalar = token_advantages("average", leaves, rewards, lengths)
    assert scalar == [[1.0] * 5, [-1.0] * 3]  # root term 1, node (0,) term 1 -> average 1
    seg = token_advantages("segment", leaves, rewards, lengths)
    assert seg == [[0.0, 0.0, 1.0, 1.0, 1.0], [0.0, 0.0, -1.0]]
    with pytest.raises(ValueError, match="estimator"):
        token_advantages("nope", leaves, rewards, lengths)  # type: ignore[arg-type]


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="one reward per leaf"):
        tree_advantage([(0,)], [1.0, 2.0])
    with pytest.raises(ValueError, match="repeat"):
        tree_advantage([(0,), (0,)], [1.0, 2.0])


def test_whiten_over_valid_tokens_only():
    values = torch.tensor([[1.0, 3.0, 99.0], [5.0, 7.0, -99.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    out = whiten(values, mask)
    # valid values 1,3,5,7: mean 4, population var 5
    expect = torch.tensor([[-3.0, -1.0, 0.0], [1.0, 3.0, 0.0]]) / math.sqrt(5 + 1e-8)
    assert torch.allclose(out, expect)
