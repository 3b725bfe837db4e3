"""The particle budget and the adaptive shape, on model-free engines with known answer-length laws.

The claims of rollout/particles.py and rollout/shape.py, each checked here:
- the multiplicity-weighted leaves are exact draws: their mean length (and any mean) is unbiased;
- a tree decodes fewer tokens than independent sampling, pathwise decoded = sum_p L_p - S;
- the closed-form expected saving and distinct leaves match what the sampler does;
- the estimators and the loss read the multiplicities;
under three answer-length laws: a constant hazard, lengths that cluster around a typical length, a heavy tail.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from treepo.config import JobSamplerConfig, SamplerConfig
from treepo.engines.simulated import HazardEngine, hazards_from_lengths
from treepo.errors import ConfigError
from treepo.rollout.accounting import compare_modes, summarize
from treepo.rollout.particles import child_particles, level_paths, split_particles
from treepo.rollout.sampler import TreeSampler
from treepo.rollout.shape import AdaptiveShape, LengthHistory, TreeShape, choose_shape, expected_cost
from treepo.train.advantages import grpo_advantage, token_advantages, tree_advantage
from treepo.train.unbiased import unbiased_advantages
from treepo.train.update import build_samples
from treepo.tree import leaf_weights

BUDGET = 256
W = 16


def _clustered(mean: float, sd: float, cap: int = BUDGET) -> list[float]:
    return [math.exp(-(((l + 1) - mean) / sd) ** 2 / 2) for l in range(cap)]


LAWS = {
    "constant_hazard": [1 / 80],
    "clustered": hazards_from_lengths(_clustered(150, 40)),
    "heavy_tail": hazards_from_lengths([1 / (l + 20) ** 1.6 for l in range(4 * BUDGET)]),
}


def true_mean_length(rates: list[float], budget: int = BUDGET) -> float:
    """E[min(L, budget)] = sum_{l < budget} P(L > l) under per-position EOS rates."""
    alive, total = 1.0, 0.0
    for pos in range(budget):
        total += alive
        alive *= 1 - rates[min(pos, len(rates) - 1)]
    return total


def base_cfg(**kw) -> SamplerConfig:
    return SamplerConfig(width=W, depth=BUDGET // 32, segment_len=32, answer_policy="none", rep_count=0, seed=1, **kw)


# -- the rule, by hand ---------------------------------------------------------------------


def test_particles_split_evenly_and_only_at_fork_points():
    assert split_particles(16, 3) == [6, 5, 5] and split_particles(5, 5) == [1] * 5
    with pytest.raises(ValueError):
        split_particles(2, 3)
    assert child_particles(5, depth=1, fork_depth=2, branching=2) == [5]  # before the fork depth: one child
    assert child_particles(5, depth=2, fork_depth=2, branching=2) == [3, 2]
    assert child_particles(1, depth=9, fork_depth=1, branching=4) == [1]  # one particle never forks
    assert child_particles(3, depth=1, fork_depth=0, branching=4) == [1, 1, 1]  # at most one child a particle
    assert level_paths(16, 2, 2, 1, 5) == [2, 4, 8, 16, 16]
    assert level_paths(16, 1, 2, 3, 6) == [1, 1, 1, 2, 4, 8]
    assert level_paths(6, 4, 2, 1, 3) == [4, 6, 6]  # 2,2,1,1 -> 1,1,1,1,1,1


def test_expected_cost_by_hand():
    # L = 1 or 3, each with probability 1/2; budget 4, segments of 2, root fan-out 1, fork after segment 1.
    survival = np.array([1.0, 0.5, 0.5, 0.0])
    saving, distinct = expected_cost(survival, width=2, branching=2, segment_len=2, root_fanout=1, fork_depth=1)
    # decoded: L=1 -> 1 token; L=3 -> 2 shared + 1 + 1 = 4; mean 2.5 against 2 x E[L] = 4
    assert saving == pytest.approx(1 - 2.5 / 4)
    # L=1 -> one leaf holding both particles; L=3 -> two leaves
    assert distinct == pytest.approx(1.5)
    assert expected_cost(survival, 2, 2, 2, 2, 0) == pytest.approx((0.0, 2.0))  # independent sampling


def test_a_shape_that_cannot_fit_is_refused_with_the_flag_and_the_fix():
    with pytest.raises(ConfigError, match=r"fork_depth=4 is past the last fork point.*--fork_depth"):
        SamplerConfig(depth=4, fork_depth=4)
    with pytest.raises(ConfigError, match=r"--shape adaptive.*budget='transfer'.*--budget particles"):
        JobSamplerConfig(budget="transfer")
    with pytest.raises(ConfigError, match=r"init_divergence=4 contradicts --shape adaptive.*--shape fixed"):
        JobSamplerConfig(init_divergence=4)
    with pytest.raises(ConfigError, match=r"fork_depth=2 only applies to --budget particles"):
        SamplerConfig(depth=4, fork_depth=2, budget="transfer")
    with pytest.raises(ConfigError, match=r"branching=1 with budget 'particles'.*--branching"):
        SamplerConfig(width=4, branching=1)
    with pytest.raises(ConfigError, match=r"divergence_policy='entropy' does nothing with budget 'particles'.*--budget transfer"):
        JobSamplerConfig(divergence_policy="entropy")
    with pytest.raises(ConfigError, match=r"fallback_policy='root' does nothing"):
        SamplerConfig(fallback_policy="root")
    with pytest.raises(ConfigError, match=r"min_distinct=0"):
        SamplerConfig(min_distinct=0)
    JobSamplerConfig(mode="independent", budget="transfer")  # the baseline ignores the shape


# -- unbiased leaves, fewer tokens, the closed form: three answer-length laws ------------------


@pytest.mark.parametrize("law", sorted(LAWS))
def test_weighted_leaves_are_policy_draws_and_the_tree_decodes_less(law):
    rates = LAWS[law]
    truth = true_mean_length(rates)
    groups = 150
    ind = TreeSampler(base_cfg(mode="independent"), HazardEngine(rates, seed=4)).rollout([[0]] * groups)
    history = LengthHistory()
    history.observe(ind.trees)
    shape = choose_shape(history.survival(BUDGET), base_cfg())
    tree = TreeSampler(base_cfg(), HazardEngine(rates, seed=3)).rollout([[0]] * groups, shape=shape)

    # Unbiased: the multiplicity-weighted mean length per group averages to the law's mean.
    weighted = [sum(w * t.model_tokens(x) for w, x in zip(leaf_weights(t.leaves, t.multiplicity()), t.leaves))
                for t in tree.trees]
    half = 3 * float(np.std(weighted, ddof=1)) / math.sqrt(groups)
    assert abs(float(np.mean(weighted)) - truth) < half, (np.mean(weighted), truth)

    # Fewer tokens: pathwise decoded = sum over particles of L - S; in expectation below w E[L].
    for t in tree.trees:
        assert sum(t.multiplicity()) == W
        assert t.decoded_tokens == t.particle_tokens - t.shared_tokens
    dec_tree = np.array([t.decoded_tokens for t in tree.trees], dtype=float)
    dec_ind = np.array([t.decoded_tokens for t in ind.trees], dtype=float)
    diff_half = 3 * math.hypot(dec_tree.std(ddof=1), dec_ind.std(ddof=1)) / math.sqrt(groups)
    assert dec_tree.mean() < dec_ind.mean() - diff_half
    assert dec_tree.mean() < W * truth

    # The closed form predicted what the sampler did (saving against the law's own cost, distinct leaves).
    measured = 1 - dec_tree.mean() / (W * truth)
    assert abs(measured - shape.expected_saving) < 3 * dec_tree.std(ddof=1) / math.sqrt(groups) / (W * truth)
    distinct = np.array([len(t.leaves) for t in tree.trees], dtype=float)
    assert abs(distinct.mean() - shape.expected_distinct) < 3 * distinct.std(ddof=1) / math.sqrt(groups) + 0.05
    assert shape.expected_distinct >= 0.75 * W - 1e-9

    # The accounting adds up: the estimated saving is what the two runs measure, within noise.
    a, b = summarize([tree], base_cfg()), summarize([ind], base_cfg(mode="independent"))
    assert a["decoded_tokens"] == a["particle_tokens"] - a["shared_tokens"]
    assert b["shared_tokens"] == 0 and b["estimated_saving_vs_independent"] == pytest.approx(0.0)
    assert abs(a["estimated_saving_vs_independent"] - compare_modes(a, b)["measured_saving"]) < 0.08


def test_long_clustered_answers_save_a_third_with_twelve_distinct_leaves_of_sixteen():
    history = LengthHistory()
    ind = TreeSampler(base_cfg(mode="independent"), HazardEngine(LAWS["clustered"], seed=4)).rollout([[0]] * 60)
    history.observe(ind.trees)
    shape = choose_shape(history.survival(BUDGET), base_cfg())
    assert shape.root_fanout < W and shape.expected_saving > 0.35 and shape.expected_distinct >= 12


def test_answers_within_one_segment_make_the_adaptive_sampler_sample_independently():
    cfg = replace(base_cfg(), shape="adaptive")
    short = hazards_from_lengths(_clustered(8, 2))  # answers of about 8 tokens; segments are at least 16
    sampler = TreeSampler(cfg, HazardEngine(short, seed=0))
    first = sampler.rollout([[0]] * 8)
    assert first.shape.root_fanout == W and "no answer lengths" in first.shape.reason
    second = sampler.rollout([[0]] * 8)
    assert second.shape.independent and "independent sampling" in second.shape.reason
    assert all(t.root_fanout == W for t in second.trees)
    # run as independent sampling: the same draws as an independent run with the same seed, token for token
    ind = TreeSampler(replace(cfg, mode="independent"), HazardEngine(short, seed=0)).rollout([[0]] * 8)
    assert [t.decoded_tokens for t in second.trees] == [t.decoded_tokens for t in ind.trees]
    assert [sorted(t.nodes) for t in second.trees] == [sorted(t.nodes) for t in ind.trees]


def test_the_adaptive_sampler_learns_a_tree_for_long_answers():
    sampler = TreeSampler(replace(base_cfg(), shape="adaptive"), HazardEngine(LAWS["clustered"], seed=0))
    sampler.rollout([[0]] * 4)
    result = sampler.rollout([[0]] * 4)
    assert result.shape.root_fanout < W and sampler.cfg.response_budget == BUDGET
    assert all(t.root_fanout == result.shape.root_fanout for t in result.trees)
    state = sampler.shaper.history.state()
    again = AdaptiveShape(sampler.base_cfg)
    again.history.load(state)
    assert again.next_shape() == sampler.shaper.next_shape()  # a resumed run chooses the same shape


# -- the estimators and the loss read the multiplicities -----------------------------------

# Width 4: the root splits 2 + 2; path (0,) ends holding 2 particles, (1,) forks into (1, 0) and (1, 1).
LEAVES, COUNTS, REWARDS = [(0,), (1, 0), (1, 1)], [2, 1, 1], [1.0, 0.0, 1.0]


def test_grpo_and_tree_advantages_count_each_leaf_as_its_particles():
    expanded = grpo_advantage([1.0, 1.0, 0.0, 1.0])
    assert grpo_advantage(REWARDS, multiplicity=COUNTS) == pytest.approx([expanded[0], expanded[2], expanded[3]])
    # Eq. 5: leaf (1, 0): root term 0 - 3/4, node (1,) term 0 - 1/2 -> mean -0.625
    assert tree_advantage(LEAVES, REWARDS, "average", COUNTS) == pytest.approx([0.25, -0.625, 0.375])


def test_unbiased_advantages_with_particles_by_hand():
    # shares 1/2 everywhere; V(1,) = 1/2, V(root) = 3/4; baselines B(0,) = 1/2, B(1,) = 1, B(1,0) = 1, B(1,1) = 0;
    # leaf weights m / w = 1/2, 1/4, 1/4, times 3 leaves.
    advs = unbiased_advantages(LEAVES, REWARDS, COUNTS)
    assert advs == [pytest.approx([0.75]), pytest.approx([-0.375, -0.75]), pytest.approx([-0.375, 0.75])]
    assert leaf_weights(LEAVES, COUNTS) == pytest.approx([0.5, 0.25, 0.25])
    # an uneven split: particle shares, not 1 / children
    assert leaf_weights([(0,), (1,), (2,)], [2, 1, 1]) == pytest.approx([0.5, 0.25, 0.25])
    assert leaf_weights([(0,), (1,), (2,)]) == pytest.approx([1 / 3] * 3)


def test_the_loss_weighs_each_leaf_by_its_particles():
    tree = TreeSampler(SamplerConfig(width=4, depth=2, segment_len=3, answer_policy="none", rep_count=0),
                       HazardEngine(0.0)).rollout([[5]], shape=TreeShape(3, 2, 2, 1)).trees[0]
    tree.leaves, tree.particles = [(0, 0), (1, 0), (1, 1)], {(0,): 2, (1,): 2, (0, 0): 2, (1, 0): 1, (1, 1): 1}
    del tree.nodes[(0, 1)]
    tree.rewards = {(0, 0): 1.0, (1, 0): 0.0, (1, 1): 1.0}
    samples = build_samples([tree], "grpo", "none")
    expanded = grpo_advantage([1.0, 1.0, 0.0, 1.0])
    per_leaf = [expanded[0] * 2 * 3 / 4, expanded[2] * 1 * 3 / 4, expanded[3] * 1 * 3 / 4]
    assert [s.advantages[0] for s in samples] == pytest.approx(per_leaf)
    assert token_advantages("grpo", [(0,), (1,), (2,)], [1.0, 0.0, 1.0], [[3], [3], [3]], [2, 1, 1])[0] == \
        pytest.approx([per_leaf[0]] * 3)


def test_the_particle_policy_gradient_is_unbiased_on_a_tabular_policy():
    """Two-step tabular softmax policy; trees grown by the particle rule (width 4, a random root fan-out
    fixed before any draw, forks into 2 while a node holds more than one particle). The unbiased estimator
    with multiplicities averages to the exact policy gradient."""
    rng = np.random.default_rng(1)
    theta = {(): np.array([0.3, -0.2]), (0,): np.array([1.0, -0.5]), (1,): np.array([-0.4, 0.6])}
    reward = {(0, 0): 1.0, (0, 1): -1.0, (1, 0): 0.5, (1, 1): -0.25}

    def pi(prefix):
        e = np.exp(theta[prefix] - theta[prefix].max())
        return e / e.sum()

    def grad(prefix, a):
        g = np.zeros(6)
        k = sorted(theta).index(prefix)
        g[2 * k: 2 * k + 2] = np.eye(2)[a] - pi(prefix)
        return g

    exact = sum(pi(())[a] * pi((a,))[b] * reward[(a, b)] * (grad((), a) + grad((a,), b)) for a in (0, 1) for b in (0, 1))
    draws = []
    for _ in range(4000):
        tokens, leaves, counts = {}, [], []
        k = int(rng.choice([1, 2, 4]))
        for j, m in enumerate(split_particles(4, k)):
            tokens[(j,)] = (int(rng.choice(2, p=pi(()))),)
            for i, c in enumerate(child_particles(m, 1, 1, 2)):
                tokens[(j, i)] = tokens[(j,)] + (int(rng.choice(2, p=pi(tokens[(j,)]))),)
                leaves.append((j, i))
                counts.append(c)
        advs = unbiased_advantages(leaves, [reward[tokens[x]] for x in leaves], counts)
        g = sum(a[0] * grad((), tokens[x][0]) + a[1] * grad(tokens[x][:1], tokens[x][1]) for x, a in zip(leaves, advs))
        draws.append(g / len(leaves))
    draws = np.array(draws)
    z = np.abs(draws.mean(0) - exact) / (draws.std(0, ddof=1) / math.sqrt(len(draws)) + 1e-12)
    assert z.max() < 4.5, (draws.mean(0), exact, z)
    assert torch.tensor(exact).abs().max() > 0.05  # the check has something to find


def test_trl_rows_repeat_a_particle_leaf_and_share_its_advantage():
    """TRL sees num_generations rows per prompt: a leaf holding m particles is m rows; the rows' advantages sum,
    per leaf, to what treepo train gives the leaf (build_samples), so TRL's loss weighs each particle once."""
    from treepo.integrations.trl.rollout import completions, row_advantages

    def tree():
        t = TreeSampler(SamplerConfig(width=4, depth=2, segment_len=3, answer_policy="none", rep_count=0),
                        HazardEngine(0.0)).rollout([[5]], shape=TreeShape(3, 2, 2, 1)).trees[0]
        t.leaves, t.particles = [(0, 0), (1, 0), (1, 1)], {(0,): 2, (1,): 2, (0, 0): 2, (1, 0): 1, (1, 1): 1}
        del t.nodes[(0, 1)]
        return t

    ids, logps = completions([tree()])
    assert len(ids) == 4 and ids[0] == ids[1] and len(logps[0]) == len(ids[0]) == 6
    rows = row_advantages([tree()], [1.0, 1.0, 0.0, 1.0], "grpo", "none")
    ref = tree()
    ref.rewards = {(0, 0): 1.0, (1, 0): 0.0, (1, 1): 1.0}
    leaf_advs = [s.advantages for s in build_samples([ref], "grpo", "none")]
    assert rows[0] == rows[1] and [a + b for a, b in zip(rows[0], rows[1])] == pytest.approx(
        [x * 4 / 3 for x in leaf_advs[0]])  # 2 rows = the leaf's advantage x width / leaves
    assert rows[2] == pytest.approx([x * 4 / 3 for x in leaf_advs[1]])
    # each row is the GRPO advantage of one of the width draws
    assert [r[0] for r in rows] == pytest.approx(grpo_advantage([1.0, 1.0, 0.0, 1.0]))


@pytest.mark.parametrize("whitening", ["token", "group"])
def test_recentring_counts_each_particle_once(whitening):
    """'token' / 'group' whitening centre each particle's own advantage over the particles' tokens: divided by
    its leaf's particle factor, the whitened values have weighted mean 0 (per group for 'group') and, for
    'token', weighted variance 1, where a leaf's tokens count once per particle."""
    rng = np.random.default_rng(0)
    trees = TreeSampler(base_cfg(), HazardEngine(1 / 40, seed=2)).rollout([[0]] * 3, shape=TreeShape(32, 8, 2, 2)).trees
    for t in trees:
        t.rewards = {leaf: float(rng.integers(0, 2)) for leaf in t.leaves}
    assert any(max(t.multiplicity()) > 1 for t in trees)
    samples = build_samples(trees, "average", whitening)
    per_particle = [np.array(s.advantages) / s.meta["factor"] for s in samples]
    weights = [np.full(len(a), s.meta["particles"], dtype=float) for a, s in zip(per_particle, samples)]
    groups = {s.group for s in samples} if whitening == "group" else {None}
    for g in groups:
        pick = [i for i, s in enumerate(samples) if g is None or s.group == g]
        a, w = np.concatenate([per_particle[i] for i in pick]), np.concatenate([weights[i] for i in pick])
        assert abs(np.average(a, weights=w)) < 1e-9
    if whitening == "token":
        a, w = np.concatenate(per_particle), np.concatenate(weights)
        assert np.average(a ** 2, weights=w) == pytest.approx(1.0, rel=1e-6)
