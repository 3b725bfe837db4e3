"""The tree estimators on verl's own batch type (DataProto through verl's compute_advantage) equal
treepo's on the same trees, to 1e-6; and they refuse to run without the trees."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from fakes import FakeEngine
from verl.protocol import DataProto
from verl.trainer.config import AlgoConfig
from verl.trainer.ppo.ray_trainer import compute_advantage

import treepo.integrations.verl.plugin  # noqa: F401  (registers the estimators, as the entry point does)
from treepo.config import SamplerConfig
from treepo.errors import ConfigError, InputError
from treepo.integrations.rows import completions, row_advantages
from treepo.integrations.verl.estimators import StepRows, tree_rows_for_step
from treepo.integrations.verl.settings import TreeSettings
from treepo.integrations.verl.tree_rows import leaf_fields
from treepo.rollout.sampler import TreeSampler


def _trees(budget: str, seed: int):
    rng = random.Random(seed)
    stops = {}

    def script(req):  # some paths end early at EOS, at random depths
        key = (req.group, req.node_id)
        if key not in stops:
            stops[key] = rng.random() < 0.3
        return {"text": "ab", "eos": True} if stops[key] else None

    cfg = SamplerConfig(width=8, depth=4, segment_len=3, branching=2, init_divergence=2, budget=budget, seed=seed,
                        answer_policy="none")
    return TreeSampler(cfg, FakeEngine(script=script)).rollout([[5, 6, 7], [8, 9], [10]]).trees


def _leaf_rewards(trees, draw):
    """One reward per row, `draw(row)`, the copies of one leaf given its first copy's: they are one answer, scored
    alike (verl scores each session; a deterministic scorer agrees)."""
    rewards = [draw(i) for i in range(sum(t.group_size for t in trees))]
    at = 0
    for t in trees:
        for m in t.leaf_counts():
            rewards[at : at + m] = [rewards[at]] * m
            at += m
    return rewards


def _verl_batch(trees, rewards, order):
    """verl's batch of the trees' rows in `order`: right-padded responses, reward at each row's last token."""
    ids, _ = completions(trees)
    fields = [f for t in trees for f in leaf_fields(t)]
    uids = [f"uid-{g}" for g, t in enumerate(trees) for _ in range(t.group_size)]
    length = max(len(r) for r in ids)
    responses = torch.zeros(len(ids), length, dtype=torch.long)  # [B, L]
    mask = torch.zeros(len(ids), length)  # [B, L]
    scores = torch.zeros(len(ids), length)  # [B, L]
    for i, r in enumerate(ids):
        responses[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        scores[i, len(r) - 1] = rewards[i]
    data = DataProto.from_dict(
        tensors={"responses": responses[order], "response_mask": mask[order], "token_level_rewards": scores[order]},
        non_tensors={"uid": np.array([uids[i] for i in order], dtype=object)})
    return data, [fields[i] for i in order]


@pytest.mark.parametrize("budget", ["particles", "transfer"])
@pytest.mark.parametrize("name,advantage,whitening", [("treepo", "unbiased", "scale"), ("treepo_paper", "average", "none"),
                                                      ("treepo", "segment", "token"), ("treepo", "grpo", "none")])
def test_verl_estimator_equals_treepos_on_the_same_trees(budget, name, advantage, whitening):
    trees = _trees(budget, seed=3)
    rows = sum(t.group_size for t in trees)
    rng = random.Random(7)
    rewards = _leaf_rewards(trees, lambda i: float(rng.choice([0.0, 1.0, 0.5])))
    order = list(range(rows))
    random.Random(1).shuffle(order)  # verl's batch order is its own (balancing reorders rows)
    data, fields = _verl_batch(trees, rewards, order)
    settings = TreeSettings(SamplerConfig(width=8), advantage, whitening)
    with tree_rows_for_step(StepRows(list(data.non_tensor_batch["uid"]), fields, data.batch["responses"], settings)):
        out = compute_advantage(data, adv_estimator=name, config=AlgoConfig(adv_estimator=name))
    expected = row_advantages(copy.deepcopy(trees), rewards, advantage, whitening)
    got = out.batch["advantages"]  # [B, L]
    assert got.shape == data.batch["response_mask"].shape
    for pos, i in enumerate(order):
        n = len(expected[i])
        assert torch.allclose(got[pos, :n].double(), torch.tensor(expected[i], dtype=torch.float64), atol=1e-6)
        assert torch.all(got[pos, n:] == 0)
    assert torch.equal(out.batch["returns"], got)
    assert got.abs().sum() > 0  # the rewards differ within groups: not a vacuous comparison of zeros


def test_estimator_without_the_trainer_mode_names_the_fix():
    trees = _trees("particles", seed=0)
    rows = sum(t.group_size for t in trees)
    data, _ = _verl_batch(trees, [1.0] * rows, list(range(rows)))
    with pytest.raises(ConfigError, match=r"trainer.v1.trainer_mode=treepo"):
        compute_advantage(data, adv_estimator="treepo", config=AlgoConfig(adv_estimator="treepo"))


@pytest.mark.parametrize("budget,drop", [("particles", 0), ("transfer", 0), ("particles", -1), ("transfer", -1)])
def test_a_prompt_that_lost_a_row_gets_no_advantage_and_is_counted(budget, drop):
    """A session that failed after its tree was grown (its reward, say) leaves the prompt without a row: its other
    rows get advantage 0 (no tree advantages without the whole tree), the whole prompts treepo's own; and a step
    where no prompt is whole is refused."""
    trees = _trees(budget, seed=2)
    rows = sum(t.group_size for t in trees)
    rewards = _leaf_rewards(trees, lambda i: float(i % 3 == 0))
    data, fields = _verl_batch(trees, rewards, list(range(rows)))
    first = trees[0].group_size  # the first prompt's rows are 0 .. first-1
    lost = range(first)[drop]
    keep = [i for i in range(rows) if i != lost]
    step = StepRows(list(data.non_tensor_batch["uid"][keep]), [fields[i] for i in keep], data.batch["responses"][keep],
                    TreeSettings(SamplerConfig(width=8), "unbiased", "none"))
    with tree_rows_for_step(step):
        out = compute_advantage(data.select_idxs(keep), adv_estimator="treepo", config=AlgoConfig(adv_estimator="treepo"))
    got = out.batch["advantages"]
    assert step.incomplete_rows == first - 1 and torch.all(got[: first - 1] == 0)
    expected = row_advantages(copy.deepcopy(trees[1:]), rewards[first:], "unbiased", "none")
    for pos, e in enumerate(expected, start=first - 1):
        assert torch.allclose(got[pos, : len(e)].double(), torch.tensor(e, dtype=torch.float64), atol=1e-6)
    only = [i for i in keep if i < first]
    with tree_rows_for_step(StepRows(list(data.non_tensor_batch["uid"][only]), [fields[i] for i in only],
                                     data.batch["responses"][only], step.settings)):
        with pytest.raises(InputError, match="no prompt of the step has its whole tree"):
            compute_advantage(data.select_idxs(only), adv_estimator="treepo", config=AlgoConfig(adv_estimator="treepo"))


def test_verls_padding_rows_and_rejected_tokens_are_handled():
    """verl pads a batch with 'pad<hex>' rows (a copy of row 0's fields, one masked token) and may mask tokens out
    (rollout rejection) before the estimator: padding gets 0, the rest treepo's advantages, masked."""
    trees = _trees("particles", seed=5)
    rows = sum(t.group_size for t in trees)
    rng = random.Random(3)
    rewards = _leaf_rewards(trees, lambda i: float(rng.choice([0.0, 1.0])))
    data, fields = _verl_batch(trees, rewards, list(range(rows)))
    pad = DataProto.from_dict(
        tensors={"responses": torch.zeros(2, data.batch["responses"].shape[1], dtype=torch.long),
                 "response_mask": torch.zeros(2, data.batch["responses"].shape[1]),
                 "token_level_rewards": torch.zeros(2, data.batch["responses"].shape[1])},
        non_tensors={"uid": np.array(["pad0123", "pad0123"], dtype=object)})
    data = DataProto.concat([data, pad])
    fields = fields + [dict(fields[0]), dict(fields[0])]
    data.batch["response_mask"][0, 0] = 0  # a token verl rejected
    settings = TreeSettings(SamplerConfig(width=8), "unbiased", "scale")
    with tree_rows_for_step(StepRows(list(data.non_tensor_batch["uid"]), fields, data.batch["responses"], settings)):
        out = compute_advantage(data, adv_estimator="treepo", config=AlgoConfig(adv_estimator="treepo"))
    got = out.batch["advantages"]
    expected = row_advantages(copy.deepcopy(trees), rewards, "unbiased", "scale")
    assert torch.all(got[rows:] == 0) and got[0, 0] == 0
    for i in range(rows):
        n = len(expected[i])
        want = torch.tensor(expected[i], dtype=torch.float64) * data.batch["response_mask"][i, :n].double()
        assert torch.allclose(got[i, :n].double(), want, atol=1e-6)
