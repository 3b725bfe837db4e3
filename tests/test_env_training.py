"""Environment turns on a tiny real model: the engine continues after env tokens correctly, env
tokens are never counted as decoded, and the trainer masks them out of the loss and its token counts."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch

import tiny
from treepo.config import EngineConfig, RewardConfig, SamplerConfig, TrainConfig
from treepo.engines.transformers_engine import TransformersEngine
from treepo.train.logprobs import Sample, collate, response_logprobs
from treepo.rollout.sampler import TreeSampler
from treepo.train.trainer import Trainer, run_train
from treepo.train.update import build_samples

TURNS = dict(segment_mode="turn", max_turn_tokens=10, stop_strings=["e"], env="toy_envs:ToolMessage")


@pytest.fixture
def prompts(tmp_path) -> Path:
    return tiny.write_prompts(tmp_path / "prompts.jsonl", 8)


def _cfgs(prompts: Path, out: Path, **train):
    args = dict(prompts=str(prompts), num_prompts=8, steps=1, prompts_per_step=2, micro_batch_size=3,
                learning_rate=1e-3, out=str(out), checkpoint_every=0, tensorboard=False, dynamic_sampling=False)
    args.update(train)
    return (EngineConfig(threads=1), SamplerConfig(width=4, depth=4, segment_len=8, **TURNS),
            RewardConfig(reward="toy_rewards:letter_share"), TrainConfig(**args))


def test_engine_continues_after_env_turns_exactly_and_does_not_decode_them():
    model, tok = tiny.model("llama"), tiny.tokenizer()
    engine = TransformersEngine(model, tok, EngineConfig(temperature=0.7), seed=3)
    cfg = SamplerConfig(width=4, depth=4, segment_len=8, **TURNS)
    result = TreeSampler(cfg, engine).rollout([tok("What is 1 plus 1?")["input_ids"], tok("Count")["input_ids"]])
    env_nodes = [n for t in result.trees for n in t.nodes.values() if n.env]
    assert env_nodes, "no env turn happened: the test would not test anything"
    assert all(tok.decode(n.token_ids) == "\n\nTool: 42\n\nAnswer:" for n in env_nodes)
    assert engine.stats.decode_tokens == sum(t.decoded_tokens for t in result.trees)  # env tokens: prefilled only
    stopped = [n for t in result.trees for n in t.nodes.values() if n.hit_stop]
    assert stopped and all("e" in n.text and "e" not in tok.decode(n.token_ids[:-1]) for n in stopped)
    # the engine's log-probs of every model token after env turns equal a full forward of the conversation
    samples = []
    for t in result.trees:
        for leaf in t.leaves:
            traj = t.trajectory(leaf)
            samples.append(Sample(t.prompt_ids, traj.token_ids, [0.0] * len(traj.token_ids), traj.logprobs,
                                  loss_mask=traj.loss_mask))
    batch = collate(samples, tok.pad_token_id)
    assert (~batch.response_mask & (batch.old_logprobs != 0)).sum() == 0  # env tokens carry log-prob 0.0
    with torch.no_grad():
        logp, _ = response_logprobs(model, batch, temperature=0.7)
    after_env = torch.zeros_like(batch.response_mask)
    for b, s in enumerate(samples):
        first_env = s.loss_mask.index(False) if False in s.loss_mask else len(s.loss_mask)
        after_env[b, first_env:len(s.loss_mask)] = torch.tensor(s.loss_mask[first_env:])
    assert after_env.sum() > 0
    diff = (logp - batch.old_logprobs).abs()[batch.response_mask]
    assert diff.max() < 1e-4


@pytest.mark.parametrize("packing", [True, False])
def test_env_tokens_are_masked_in_the_loss_and_its_normaliser(prompts, tmp_path, monkeypatch, packing):
    import treepo.train.update as trainer_mod

    normalisers, grads = [], []
    real = trainer_mod.ppo_loss
    monkeypatch.setattr(trainer_mod, "ppo_loss", lambda *a, **k: normalisers.append(a[4]) or real(*a, **k))
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, closure=None: grads.append(  # record, do not update
        [p.grad.clone() for g in self.param_groups for p in g["params"]]))
    trainer = Trainer(*_cfgs(prompts, tmp_path / "run"), model=tiny.model("llama"), tokenizer=tiny.tokenizer())
    trees = trainer.sampler.rollout(trainer.pool_ids[:2]).trees
    for tree in trees:
        for k, leaf in enumerate(tree.leaves):
            tree.rewards[leaf] = float(k % 2)
    trainer.update.packed = packing
    samples = build_samples(trees, trainer.cfg.advantage, "token")
    masks = [torch.tensor(s.loss_mask) for s in samples]
    assert any((~m).any() for m in masks), "no env tokens in the step"
    adv = torch.tensor([a for s in samples for a in s.advantages], dtype=torch.float64)
    trained = torch.cat(masks)
    # whitened on them, each particle once: a leaf's own advantage (over its particle factor), counted per particle
    own = torch.tensor([a / s.meta["factor"] for s in samples for a in s.advantages], dtype=torch.float64)[trained]
    count = torch.tensor([s.meta["particles"] for s in samples for _ in s.advantages], dtype=torch.float64)[trained]
    mean = (count * own).sum() / count.sum()
    assert abs(mean) < 1e-6 and abs((count * (own - mean) ** 2).sum() / count.sum() - 1) < 1e-4
    assert (adv[~trained] == 0).all()


    def perturbed(where_trained: bool) -> list[Sample]:
        rng = random.Random(0)
        out = copy.deepcopy(samples)
        for s in out:
            for i, m in enumerate(s.loss_mask):
                if m == where_trained:
                    s.advantages[i] = rng.uniform(-50, 50)
                    s.old_logprobs[i] = rng.uniform(-5, 0)
        return out

    trainer.update._optimizer_step(samples, detach_old=False)
    trainer.update._optimizer_step(perturbed(where_trained=False), detach_old=False)  # env tokens only
    trainer.update._optimizer_step(perturbed(where_trained=True), detach_old=False)  # control: trained tokens
    n_trained = sum(int(m.sum()) for m in masks)
    assert set(normalisers) == {float(n_trained)} and n_trained < sum(len(s.response_ids) for s in samples)
    assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[1]))  # env tokens change nothing
    assert any(not torch.allclose(a, b) for a, b in zip(grads[0], grads[2]))  # the test can fail


def test_a_training_step_with_an_env_counts_only_model_tokens(prompts, tmp_path):
    out = tmp_path / "run"
    run_train(*_cfgs(prompts, out), model=tiny.model("llama"), tokenizer=tiny.tokenizer())
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["group_size"] == 4 and row["trajectories_per_prompt"] == row["distinct_leaves_per_group"] <= 4
    assert row["env_turns"] > 0
    assert row["tree_depth_max"] <= 4  # model segments only: env levels are not depth (depth=4 turns)
    assert row["trained_tokens"] == row["leaf_tokens"]  # every model token of every leaf, no env token
    assert row["decoded_tokens"] <= row["leaf_tokens"]
