"""Leaf weights, the unbiased estimator and the whitening modes: hand-computed values, and the truth of a
model-free engine whose answer-length law is known."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from treepo.config import SamplerConfig, TrainConfig
from treepo.engines.simulated import HazardEngine
from treepo.errors import ConfigError
from treepo.rollout.accounting import compare_modes, summarize
from treepo.rollout.sampler import TreeSampler
from treepo.train.advantages import center_groups, scale, token_advantages, whiten
from treepo.train.unbiased import tree_values, unbiased_advantages
from treepo.tree import leaf_weights

# A root with children (0,) and (1,); (0,) forks into (0,0) and (0,1); (1,) is a leaf.
LEAVES = [(0, 0), (0, 1), (1,)]
REWARDS = [1.0, 0.0, 0.0]


def test_leaf_weights_by_hand():
    assert leaf_weights(LEAVES) == [0.25, 0.25, 0.5]
    assert leaf_weights([(0,), (1,), (2,), (3,)]) == [0.25] * 4  # independent samples: the plain mean
    assert leaf_weights([(0, 0, 0), (1,)]) == [0.5, 0.5]  # a chain of single children costs nothing


def test_weighted_mean_is_the_recursive_root_value():
    value, children, _ = tree_values(LEAVES, REWARDS)
    assert value[(0,)] == 0.5 and value[(1,)] == 0.0 and value[()] == 0.25
    assert children[()] == [(0,), (1,)] and children[(0,)] == [(0, 0), (0, 1)]
    assert np.dot(leaf_weights(LEAVES), REWARDS) == pytest.approx(value[()])


def test_unbiased_advantages_by_hand():
    # A(n) = V(n) - mean of its siblings' V: A(0)=0.5-0=0.5, A(1)=0-0.5=-0.5, A(0,0)=1-0=1, A(0,1)=0-1=-1;
    # times w(leaf) * 3 leaves: 0.75, 0.75, 1.5.
    got = unbiased_advantages(LEAVES, REWARDS)
    assert got == [pytest.approx([0.375, 0.75]), pytest.approx([0.375, -0.75]), pytest.approx([-0.75])]
    # a segment's weighted credit summed over the leaves under it is n * W(node) * A(node): 3 * 0.5 * 0.5
    assert got[0][0] + got[1][0] == pytest.approx(0.75)


def test_a_single_child_inherits_its_parents_baseline():
    # (0,) has one child: its baseline is the parent's (built from (1,)), not its own value.
    assert unbiased_advantages([(0, 0), (1,)], [1.0, 0.0]) == [pytest.approx([1.0, 1.0]), pytest.approx([-1.0])]
    assert unbiased_advantages([(0, 0)], [1.0]) == [pytest.approx([1.0, 1.0])]  # one path: baseline 0


def test_on_independent_samples_it_is_rloo():
    rewards = [1.0, 0.0, 0.0, 1.0]
    leaves = [(j,) for j in range(4)]
    got = [a for (a,) in unbiased_advantages(leaves, rewards)]
    assert got == pytest.approx([r - (sum(rewards) - r) / 3 for r in rewards])


def test_token_advantages_spread_each_segment_value_over_its_tokens():
    per_token = token_advantages("unbiased", LEAVES, REWARDS, [[2, 1], [2, 3], [4]])
    assert per_token == [pytest.approx([0.375, 0.375, 0.75]), pytest.approx([0.375, 0.375, -0.75, -0.75, -0.75]),
                         pytest.approx([-0.75] * 4)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False, allow_subnormal=False), min_size=1, max_size=40), st.data())
def test_scale_never_changes_a_sign(values, data):
    x = torch.tensor(values, dtype=torch.float64)
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=len(values), max_size=len(values))))
    out = scale(x, mask)
    assert (torch.sign(out[mask]) == torch.sign(x[mask])).all() and (out[~mask] == 0).all()


def test_token_whitening_can_flip_a_sign_and_group_centring_is_per_group():
    x = torch.tensor([1.0, -1.0, -1.0, -1.0], dtype=torch.float64)  # one short right answer, long wrong ones
    mask = torch.ones(4, dtype=torch.bool)
    assert whiten(x, mask)[0] > 0 and scale(x, mask)[1] < 0
    flipped = whiten(torch.tensor([-0.5, -1.0, -1.0]), torch.ones(3, dtype=torch.bool))
    assert flipped[0] > 0  # a wrong answer's -0.5 becomes positive after re-centring
    g = center_groups(torch.tensor([1.0, 3.0, 10.0, 20.0]), mask, torch.tensor([0, 0, 1, 1]))
    assert g.tolist() == [-1.0, 1.0, -5.0, 5.0]


# -- against the truth: HazardEngine's answers end at each token with probability 1/48 -----------------

HAZARD, BUDGET, SHORT = 1 / 48, 128, 40
TRUTH = 1 - (1 - HAZARD) ** SHORT  # the policy's share of answers of at most 40 tokens: 0.569


def _share_short(cfg: SamplerConfig, prompts: int) -> tuple[list[float], list[float], dict]:
    result = TreeSampler(cfg, HazardEngine(HAZARD, seed=cfg.seed)).rollout([[0]] * prompts)
    raw, weighted = [], []
    for t in result.trees:
        short = [len(t.response_ids(x)) <= SHORT for x in t.leaves]
        raw.append(float(np.mean(short)))
        weighted.append(float(np.dot(leaf_weights(t.leaves), short)))
    return raw, weighted, summarize([result], cfg)


def _mean_ci(xs: list[float]) -> tuple[float, float]:
    return float(np.mean(xs)), 1.96 * float(np.std(xs, ddof=1)) / math.sqrt(len(xs))


@pytest.mark.parametrize("segment_len, fanout", [(8, (0, 0)), (32, (2, 8))])
def test_weighted_leaf_mean_matches_independent_sampling_and_the_raw_mean_does_not(segment_len, fanout):
    cfg = SamplerConfig(width=8, depth=BUDGET // segment_len, segment_len=segment_len, branching=2, seed=0, budget="transfer",
                        answer_policy="none", rep_count=0, init_divergence=fanout[0], init_divergence_max=fanout[1])
    raw, weighted, tree_summary = _share_short(cfg, 400)
    ind_raw, _, ind_summary = _share_short(replace(cfg, mode="independent"), 400)
    (w, w_half), (r, r_half), (i, i_half) = _mean_ci(weighted), _mean_ci(raw), _mean_ci(ind_raw)
    assert abs(i - TRUTH) < i_half  # the independent run estimates the truth
    assert abs(w - i) < math.hypot(w_half, i_half)  # the weighted tree estimate agrees with it
    assert abs(w - TRUTH) < w_half
    assert abs(r - i) > 3 * math.hypot(r_half, i_half)  # the raw leaf mean is far off: leaves lean long
    # leaves run longer than the policy's answers, and the weights see through it
    assert tree_summary["mean_response_tokens"] > ind_summary["mean_response_tokens"] + 5
    assert abs(tree_summary["weighted_response_tokens"] - ind_summary["mean_response_tokens"]) < 5
    compared = compare_modes(tree_summary, ind_summary)
    assert compared["measured_saving"] == pytest.approx(abs=1e-5, expected=
        1 - tree_summary["decoded_tokens"] / ind_summary["decoded_tokens"])
    assert compared["measured_saving"] < tree_summary["saving_vs_own_leaves"] - 0.1  # not the structural figure


def test_whiten_and_estimator_values_are_checked_with_the_fix():
    with pytest.raises(ConfigError, match=r"whiten='tokens'.*token, scale, group, none"):
        TrainConfig(whiten="tokens")
    with pytest.raises(ConfigError, match=r"advantage='rloo'.*unbiased"):
        TrainConfig(advantage="rloo")
    assert TrainConfig(whiten=True).whitening == "token" and TrainConfig(whiten=False).whitening == "none"
    assert TrainConfig().whitening == "scale" and TrainConfig(advantage="grpo").whitening == "none"


@pytest.mark.parametrize("flags, message", [
    (["--whiten", "tokens"], "whiten='tokens'"),
    (["--advantage", "rloo"], "advantage"),
    (["--mode", "independent", "--advantage", "average"], "advantage='average' reads subtrees"),
])
def test_bad_estimator_flags_are_one_line_errors_before_any_model_work(flags, message, tmp_path, capsys):
    from treepo import cli

    assert cli.main(["train", "--out", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("eval_mode", ["independent", "tree"])
def test_held_out_evaluation_samples_independently_unless_asked(eval_mode, tmp_path, monkeypatch):
    import tiny
    import treepo.train.trainer as trainer_mod
    from treepo.config import EngineConfig, RewardConfig
    from treepo.prompts import Prompt
    from treepo.train.trainer import Trainer

    prompts = tiny.write_prompts(tmp_path / "prompts.jsonl", 12)
    seen = []

    def fake_evaluate(engine, sampler_cfg, problems, reward_fn, **kw):
        seen.append(sampler_cfg)
        return {"k": 2, **{f"{m}@2": {"value": 0.5} for m in ("mean", "pass", "maj")}}, []

    monkeypatch.setattr(trainer_mod, "evaluate", fake_evaluate)
    train = TrainConfig(prompts=str(prompts), num_prompts=12, steps=1, prompts_per_step=2, out=str(tmp_path / "run"),
                        tensorboard=False, eval_mode=eval_mode)
    trainer = Trainer(EngineConfig(threads=1), SamplerConfig(width=4, depth=2, segment_len=8),
                      RewardConfig(reward="toy_rewards:letter_share"), train, model=tiny.model("llama"),
                      tokenizer=tiny.tokenizer())
    trainer.heldout = [Prompt("q", "a")]
    trainer._evaluate_heldout(log_row=False)
    assert seen[0].mode == eval_mode and seen[0].seed == trainer_mod.EVAL_SEED
    assert trainer.sampler_cfg.mode == "tree"  # training still samples trees


def test_training_logs_leaf_weighted_accuracy_beside_the_raw_leaf_mean(tmp_path):
    import json

    import tiny
    from treepo.config import EngineConfig, RewardConfig
    from treepo.train.trainer import run_train

    prompts = tiny.write_prompts(tmp_path / "prompts.jsonl", 12)
    train = TrainConfig(prompts=str(prompts), num_prompts=12, steps=1, prompts_per_step=2, out=str(tmp_path / "run"),
                        tensorboard=False, learning_rate=1e-3)
    run_train(EngineConfig(threads=1), SamplerConfig(width=4, depth=2, segment_len=8),
              RewardConfig(reward="toy_rewards:letter_share"), train, model=tiny.model("llama"),
              tokenizer=tiny.tokenizer())
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"accuracy", "accuracy_weighted", "reward_mean", "reward_weighted"} <= set(row)
    assert -1.0 <= row["reward_weighted"] <= 1.0 and 0.0 <= row["accuracy_weighted"] <= 1.0


def test_the_policy_gradient_estimate_is_unbiased_on_a_tabular_policy():
    """Monte Carlo against the exact gradient: a 2-step policy over 2 tokens with a softmax table per prefix,
    trees whose children counts (1..3) are drawn independently of outcomes. The weighted leave-one-out
    estimator averages to the exact gradient; plain V(child) - V(parent) (with the same weights) does not."""
    rng = np.random.default_rng(0)
    theta = {(): np.array([0.3, -0.2]), (0,): np.array([1.0, -0.5]), (1,): np.array([-0.4, 0.6])}
    reward = {(0, 0): 1.0, (0, 1): -1.0, (1, 0): 0.5, (1, 1): -0.25}

    def pi(prefix):
        e = np.exp(theta[prefix] - theta[prefix].max())
        return e / e.sum()

    def grad_logp(prefix, a):  # d log pi(a | prefix) / d theta, as a dict over the table
        g = {k: np.zeros(2) for k in theta}
        g[prefix] = np.eye(2)[a] - pi(prefix)
        return g

    def flat(g):
        return np.concatenate([g[k] for k in sorted(theta)])

    exact = sum(pi(())[a] * pi((a,))[b] * reward[(a, b)] * (flat(grad_logp((), a)) + flat(grad_logp((a,), b)))
                for a in (0, 1) for b in (0, 1))

    def one_tree(plain: bool):
        tokens: dict = {}
        leaves = []

        def grow(node, depth):
            if depth == 2:
                leaves.append(node)
                return
            prefix = tokens.get(node, ())
            for j in range(int(rng.integers(1, 4))):
                child = node + (j,)
                tokens[child] = prefix + (int(rng.choice(2, p=pi(prefix))),)
                grow(child, depth + 1)

        grow((), 0)
        rewards = [reward[tokens[x]] for x in leaves]
        if plain:  # V(child) - V(parent), weighted the same way
            value, _, _ = tree_values(leaves, rewards)
            w = leaf_weights(leaves)
            advs = [[wi * len(leaves) * (value[x[:k]] - value[x[: k - 1]]) for k in (1, 2)] for x, wi in zip(leaves, w)]
        else:
            advs = unbiased_advantages(leaves, rewards)
        g = np.zeros(6)
        for leaf, adv in zip(leaves, advs):
            toks = tokens[leaf]
            g += adv[0] * flat(grad_logp((), toks[0])) + adv[1] * flat(grad_logp(toks[:1], toks[1]))
        return g / len(leaves)

    for plain, should_match in ((False, True), (True, False)):
        draws = np.array([one_tree(plain) for _ in range(6000)])
        mean, se = draws.mean(0), draws.std(0, ddof=1) / math.sqrt(len(draws))
        z = np.abs(mean - exact) / se
        if should_match:
            assert z.max() < 4.5, (mean, exact, z)
        else:
            assert z.max() > 6, (mean, exact, z)  # shrunk by (c - 1) / c: biased
