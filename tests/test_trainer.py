"""The trainer end to end on a tiny random model: updates, metrics, checkpoints, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tiny
from treepo.train import checkpoint
from treepo.cli import main
from treepo.config import EngineConfig, RewardConfig, SamplerConfig, TrainConfig
from treepo.errors import ConfigError, InputError
from treepo.train.logprobs import Sample, collate, response_logprobs
from treepo.rollout.sampler import TreeSampler
from treepo.train.trainer import Trainer, run_train
from treepo.train.update import build_samples

ROW_KEYS = {"step", "reward_mean", "accuracy", "loss", "clip_fraction", "entropy", "grad_norm", "tree_depth_mean",
            "fallbacks", "trajectories_per_prompt", "decoded_tokens", "leaf_tokens", "saving_vs_own_leaves", "step_seconds"}


@pytest.fixture
def prompts(tmp_path) -> Path:
    return tiny.write_prompts(tmp_path / "prompts.jsonl", 12)


def _cfgs(prompts: Path, out: Path, reward="toy_rewards:letter_share", **train):
    args = dict(prompts=str(prompts), num_prompts=12, steps=2, prompts_per_step=2, micro_batch_size=3,
                learning_rate=1e-3, out=str(out), checkpoint_every=1, tensorboard=False)
    args.update(train)
    return (EngineConfig(threads=1), SamplerConfig(width=4, depth=2, segment_len=8),
            RewardConfig(reward=reward), TrainConfig(**args))


def _run(prompts, out, **kw):
    model = tiny.model("llama")
    summary = run_train(*_cfgs(prompts, out, **kw), model=model, tokenizer=tiny.tokenizer())
    return model, summary


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_steps_change_parameters_and_write_everything(prompts, tmp_path):
    out = tmp_path / "run"
    before = {k: v.clone() for k, v in tiny.model("llama").state_dict().items()}
    model, summary = _run(prompts, out, tensorboard=True)
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "no parameter moved"
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert ROW_KEYS <= set(rows[0]), ROW_KEYS - set(rows[0])
    assert all(r["trajectories_per_prompt"] == 4 for r in rows)
    assert all(r["grad_norm"] > 0 for r in rows)
    assert summary["steps"] == 2
    for name in ("summary.json", "reward.png", "savings.png", "model/config.json"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert checkpoint.latest_checkpoint(out).name == "step-000002"
    assert len(list((out / "checkpoints").glob("step-*"))) == 2  # keep_checkpoints=2


def test_resume_reproduces_the_next_step_exactly(prompts, tmp_path):
    straight, _ = _run(prompts, tmp_path / "a", steps=3)
    _run(prompts, tmp_path / "b", steps=2)
    resumed, _ = _run(prompts, tmp_path / "b", steps=3, resume=True)
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3]
    for key in ("loss", "grad_norm", "reward_mean", "decoded_tokens", "pg_loss"):
        assert a[2][key] == b[2][key], key
    for (name, x), y in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(x, y), name


def test_existing_run_needs_resume_and_resume_keeps_the_settings(prompts, tmp_path):
    out = tmp_path / "run"
    _run(prompts, out, steps=1)
    with pytest.raises(InputError, match="--resume"):
        _run(prompts, out, steps=1)
    with pytest.raises(ConfigError, match="train.learning_rate"):
        _run(prompts, out, steps=2, resume=True, learning_rate=0.5)
    _run(prompts, out, steps=2, resume=True, checkpoint_every=0)  # steps and checkpointing may change
    assert [r["step"] for r in _rows(out)] == [1, 2]


def test_a_run_stopped_before_its_first_checkpoint_starts_again(prompts, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "reward_mean": 0.0}\n{"step": 2, "rew')  # killed mid-line
    with pytest.raises(InputError, match="stopped before its first checkpoint.*--resume auto"):
        _run(prompts, out, steps=1, resume=True)  # --resume promises a checkpoint: there is none
    _run(prompts, out, steps=1, resume="auto")
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1] and "grad_norm" in rows[0]


def test_a_failed_checkpoint_write_leaves_the_previous_one(prompts, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _run(prompts, out, steps=1)
    good = checkpoint.latest_checkpoint(out)

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", broken)
    with pytest.raises(OSError):
        _run(prompts, out, steps=2, resume=True)
    assert checkpoint.latest_checkpoint(out) == good
    assert not list((out / "checkpoints").glob(".step-*"))  # no half-written folder left


def test_all_equal_rewards_are_dropped_and_nothing_updates(prompts, tmp_path):
    before = tiny.model("llama").state_dict()
    model, _ = _run(prompts, tmp_path / "run", reward="toy_rewards:constant", steps=1, max_resample_rounds=1)
    row = _rows(tmp_path / "run")[0]
    assert row["groups_trained"] == 0 and row["groups_dropped"] == 4 and row["resample_rounds"] == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_reward_failing_on_some_samples_is_counted_and_the_run_goes_on(prompts, tmp_path):
    _, summary = _run(prompts, tmp_path / "run", reward="toy_rewards:nan_on_odd", steps=1, dynamic_sampling=False)
    row = _rows(tmp_path / "run")[0]
    assert row["reward_failures"] == 4 and row["reward_failure_kinds"] == {"nan": 4}
    assert summary["reward_failures"] == {"nan": 4}
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["reward_failures"] == {"nan": 4}


def test_minibatches_epochs_kl_and_entropy_paths(prompts, tmp_path):
    _, summary = _run(prompts, tmp_path / "run", steps=1, mini_batches=2, ppo_epochs=2, kl_coef=0.1,
                      entropy_coef=0.01, advantage="segment")
    row = _rows(tmp_path / "run")[0]
    assert row["kl_ref"] >= 0 and row["approx_kl_old"] != 0  # later updates see a moved policy


def test_policy_logprobs_match_the_engine(prompts):
    from treepo.engines.transformers_engine import TransformersEngine

    model, tok = tiny.model("llama"), tiny.tokenizer()
    engine = TransformersEngine(model, tok, EngineConfig(temperature=0.7), seed=3)
    trees = TreeSampler(SamplerConfig(width=4, depth=3, segment_len=6), engine).rollout(
        [tok("What is 1 plus 1?")["input_ids"], tok("Count the letters")["input_ids"]]).trees
    samples = [Sample(t.prompt_ids, t.response_ids(leaf), [0.0] * len(t.response_ids(leaf)),
                      t.trajectory(leaf).logprobs) for t in trees for leaf in t.leaves]
    batch = collate(samples, tok.pad_token_id)
    with torch.no_grad():
        logp, _ = response_logprobs(model, batch, temperature=0.7)
    diff = (logp - batch.old_logprobs).abs()[batch.response_mask]
    assert diff.max() < 1e-4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts_per_step=3, mini_batches=2), "not divisible by mini_batches"),
        (dict(num_prompts=1), "raise num_prompts"),
    ],
)
def test_impossible_train_configs(kwargs, message, prompts, tmp_path):
    with pytest.raises(ConfigError, match=message):
        _cfgs(prompts, tmp_path, **kwargs)


def test_width_one_and_greedy_are_refused_before_work(prompts, tmp_path):
    engine, sampler, reward, train = _cfgs(prompts, tmp_path / "run")
    with pytest.raises(ConfigError, match="width=1"):
        Trainer(engine, SamplerConfig(width=1), reward, train, model=tiny.model(), tokenizer=tiny.tokenizer())
    with pytest.raises(ConfigError, match="greedy"):
        Trainer(EngineConfig(temperature=0), sampler, reward, train, model=tiny.model(), tokenizer=tiny.tokenizer())
    assert not (tmp_path / "run").exists()


def test_rows_without_answers_are_named(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a", "answer": "1"}) + "\n" + json.dumps({"prompt": "b"}) + "\n")
    engine, sampler, reward, train = _cfgs(path, tmp_path / "run", reward="math_verify", num_prompts=2)
    with pytest.raises(InputError, match="row 2 has no 'answer'"):
        Trainer(engine, sampler, reward, train, model=tiny.model(), tokenizer=tiny.tokenizer())


def test_cli_yaml_unknown_key_and_overrides(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  steps: 3\n  lerning_rate: 0.1\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "unknown key 'lerning_rate'" in capsys.readouterr().err
    assert main(["train", "--stepz", "3"]) == 2
    assert "did you mean --steps" in capsys.readouterr().err
    cfg.write_text("sampler:\n  width: 1\ntrain:\n  steps: 3\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "width=1" in capsys.readouterr().err  # the YAML value reached the check
    assert main(["train", "--config", str(cfg), "--width", "2", "--prompts_per_step", "3", "--mini_batches", "2"]) == 2
    assert "mini_batches=2" in capsys.readouterr().err  # the flag overrode the YAML width


def test_overlong_penalty_by_hand():
    from treepo.rewards.scoring import overlong_penalty

    assert overlong_penalty(80, budget=128, buffer=32, factor=1.0) == 0.0  # below 128 - 32 = 96
    assert overlong_penalty(96, 128, 32, 1.0) == 0.0
    assert overlong_penalty(104, 128, 32, 1.0) == pytest.approx(-0.25)  # 8 of 32 into the buffer
    assert overlong_penalty(128, 128, 32, 0.5) == pytest.approx(-0.5)
    assert overlong_penalty(500, 128, 0, 1.0) == 0.0  # off


def test_old_logprobs_are_the_policy_before_the_step(prompts, tmp_path, monkeypatch):
    """With 2 mini-batches x 2 epochs, every update's old log-probs are the pre-step policy's, batched the same."""
    import treepo.train.update as trainer_mod

    calls = []
    real = trainer_mod.ppo_loss

    def spy(logp, old, adv, mask, normaliser, **kw):
        calls.append((logp.detach().clone(), old.clone(), mask.clone()))
        return real(logp, old, adv, mask, normaliser, **kw)

    monkeypatch.setattr(trainer_mod, "ppo_loss", spy)
    _run(prompts, tmp_path / "run", steps=1, mini_batches=2, ppo_epochs=2, dynamic_sampling=False)
    first = calls[0]
    assert (first[0] - first[1]).abs()[first[2]].max() < 1e-5  # first update: old == current policy
    half = len(calls) // 2
    for a, b in zip(calls[:half], calls[half:]):  # epoch 2 reuses epoch 1's old log-probs
        assert torch.equal(a[1], b[1])
    assert any((c[0] - c[1]).abs()[c[2]].max() > 1e-4 for c in calls[1:])  # later updates see a moved policy


@pytest.mark.parametrize("packing", [False, True])
def test_gradient_accumulation_equals_one_big_batch(prompts, tmp_path, monkeypatch, packing):
    """The update's gradient is the token-mean over all its trajectories however they are micro-batched
    (flat: 1 vs 16 trajectories per micro-batch; packed: 1 vs 4 prompt groups per row)."""
    grads = []

    def record(self, closure=None):  # replaces AdamW.step: keep the gradient, skip the update
        grads.append([p.grad.clone() for group in self.param_groups for p in group["params"]])

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    _run(prompts, tmp_path / "a", steps=1, micro_batch_size=1, dynamic_sampling=False, grad_clip=0.0,
         packing=packing)
    _run(prompts, tmp_path / "b", steps=1, micro_batch_size=16, dynamic_sampling=False, grad_clip=0.0,
         packing=packing)
    assert len(grads) == 2
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-4)


def test_packed_training_equals_flat_training(prompts, tmp_path, monkeypatch):
    """Same rollouts, same update: packing changes the cost, not the result (loss, gradient, parameters)."""
    grads = []
    real_step = torch.optim.AdamW.step

    def record(self, closure=None):
        grads.append([p.grad.clone() for group in self.param_groups for p in group["params"]])
        return real_step(self, closure)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    _run(prompts, tmp_path / "flat", steps=1, dynamic_sampling=False, packing=False, mini_batches=2,
         kl_coef=0.1, entropy_coef=0.01)
    _run(prompts, tmp_path / "packed", steps=1, dynamic_sampling=False, packing=True, mini_batches=2,
         kl_coef=0.1, entropy_coef=0.01)
    a, b = _rows(tmp_path / "flat")[0], _rows(tmp_path / "packed")[0]
    assert not a["packed"] and b["packed"]
    assert b["forward_tokens"] < a["forward_tokens"] == a["flat_tokens"] == b["flat_tokens"]
    for key in ("loss", "pg_loss", "clip_fraction", "kl_ref", "trained_tokens", "grad_norm"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
    assert len(grads) == 4  # 2 mini-batches x 2 runs
    for g_flat, g_packed in zip(grads[:2], grads[2:]):
        for x, y in zip(g_flat, g_packed):
            assert torch.allclose(x, y, atol=1e-7, rtol=1e-4)
    # (Parameters are not compared: Adam divides by sqrt(v), so 1e-9 gradient noise on a near-zero
    # gradient can move a weight by up to lr either way.)
    assert any(g.abs().max() > 0 for g in grads[0])


def test_step_advantages_are_whitened_over_tokens(prompts, tmp_path):
    model = tiny.model("llama")
    trainer = Trainer(*_cfgs(prompts, tmp_path / "run"), model=model, tokenizer=tiny.tokenizer())
    result = trainer.sampler.rollout(trainer.pool_ids[:2])
    for tree in result.trees:
        for k, leaf in enumerate(tree.leaves):
            tree.rewards[leaf] = float(k % 2)
    samples = build_samples(result.trees, trainer.cfg.advantage, "token")
    flat = torch.tensor([a for s in samples for a in s.advantages], dtype=torch.float64)
    assert abs(flat.mean()) < 1e-6 and abs(flat.var(unbiased=False) - 1) < 1e-4


def test_yaml_skips_other_commands_sections_and_checks_value_types(tmp_path, capsys):
    from treepo.cli import parse_configs

    types = (EngineConfig, SamplerConfig, RewardConfig, TrainConfig)
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  num_prompts: 500\n  task_args: {min_words: 1, max_words: 2}\n"
                   "eval:\n  num_prompts: 32\n  out: runs/eval\nsampler:\n  width: 6\n")
    *_, train = parse_configs(types, ["--config", str(cfg)], "treepo train")
    assert train.num_prompts == 500 and train.out == "runs/train"
    assert json.loads(train.task_args) == {"min_words": 1, "max_words": 2}
    cfg.write_text("train:\n  dual_clip: null\n")
    with pytest.raises(ConfigError, match="dual_clip is empty"):
        parse_configs(types, ["--config", str(cfg)], "treepo train")
    cfg.write_text("train:\n  steps: 2.5\n")
    with pytest.raises(ConfigError, match=r"run.yaml': steps: '2.5' is not an integer"):  # the file and its key
        parse_configs(types, ["--config", str(cfg)], "treepo train")
