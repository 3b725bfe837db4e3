"""`--env` on `treepo rollout`, `train` and `eval` with a tiny saved model; `treepo show` marks env turns; bad environments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tiny
from treepo import cli
from treepo.config import EngineConfig, EvalConfig, RewardConfig, SamplerConfig, TrainConfig
from treepo.errors import ConfigError

TURN_FLAGS = ["--segment_mode", "turn", "--max_turn_tokens", "10", "--stop_strings", "e", "--width", "4", "--depth", "4"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny.save_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture()
def prompts_file(tmp_path) -> Path:
    return tiny.write_prompts(tmp_path / "prompts.jsonl", 3)


def test_rollout_with_an_env_then_show_marks_env_turns(model_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["rollout", "--model", str(model_dir), "--prompts", str(prompts_file), "--out", str(out),
                     "--env", "toy_envs:ToolMessage", *TURN_FLAGS]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["env_turns"] > 0 and summary["config"]["sampler"]["env"] == "toy_envs:ToolMessage"
    assert summary["group_size"] == 4 and summary["trajectories"] <= 12  # 3 prompts: distinct leaves
    assert summary["env_tokens"] == 16 * summary["env_turns"]
    rows = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    multi = [r for r in rows if r["turns"] > 1]
    assert multi and all(False in r["loss_mask"] and len(r["loss_mask"]) == len(r["token_ids"]) for r in multi)
    assert "Tool: 42" in multi[0]["text"]
    capsys.readouterr()
    assert cli.main(["show", str(out), "--terminal-trees", "3"]) == 0
    terminal = capsys.readouterr().err
    assert "env" in terminal and "not trained" in terminal
    page = (out / "trees.html").read_text()
    assert page.count('<g class="node env') == summary["env_turns"] and "environment turn" in page


def test_train_and_eval_accept_env(model_dir, prompts_file, tmp_path):
    run = tmp_path / "train"
    assert cli.main(["train", "--model", str(model_dir), "--prompts", str(prompts_file), "--num_prompts", "3",
                     "--steps", "1", "--prompts_per_step", "2", "--reward", "toy_rewards:letter_share",
                     "--learning_rate", "0.001", "--tensorboard", "false", "--out", str(run), "--env", "recheck",
                     "--max_turns", "3", *TURN_FLAGS]) == 0
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert row["group_size"] == 4 and row["trajectories_per_prompt"] <= 4
    out = tmp_path / "eval"
    assert cli.main(["eval", "--model", str(run / "model"), "--prompts", str(prompts_file), "--num_prompts", "2",
                     "--reward", "toy_rewards:letter_share", "--out", str(out), "--env", "calculator",
                     *TURN_FLAGS]) == 0
    summary = json.loads((out / "eval.json").read_text())
    assert summary["problems"] == 2 and summary["config"]["sampler"]["env"] == "calculator"


@pytest.mark.parametrize("command", ["rollout", "train", "eval"])
@pytest.mark.parametrize("args, message", [
    (["--env", "toy_envs:NoNextTurn"], "class NoNextTurn lacks the hook next_turn"),
    (["--env", "calculater"], "did you mean calculator?"),
    (["--env", "no_such_module:Env"], "cannot import module 'no_such_module'"),
    (["--env", "recheck", "--env_args", "{"], "env_args='{': not valid JSON"),
    (["--env", "recheck", "--env_args", '{"max_turns": -1}'], "RecheckEnv(**{'max_turns': -1}) failed"),
    (["--max_turn_tokens", "5"], "only applies to turn segments"),
])
def test_bad_env_is_one_clear_line_before_any_work(command, args, message, prompts_file, tmp_path, capsys):
    out = tmp_path / "never"
    extra = ["--reward", "toy_rewards:letter_share"] if command != "rollout" else []
    assert cli.main([command, "--model", "/no/such/model", "--prompts", str(prompts_file), "--out", str(out),
                     *extra, *args]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_yaml_takes_env_settings_and_stop_string_lists(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text('sampler:\n  env: recheck\n  env_args: {max_turns: 2}\n  segment_mode: turn\n'
                   '  stop_strings: ["</x>", "END"]\n  max_turn_tokens: 32\n')
    types = (EngineConfig, SamplerConfig, RewardConfig, TrainConfig)
    _, sampler, _, _ = cli.parse_configs(types, ["--config", str(cfg)], "treepo train")
    assert sampler.env == "recheck" and json.loads(sampler.env_args) == {"max_turns": 2}
    assert sampler.stop_strings == ["</x>", "END"] and sampler.segment_cap == 32
    _, sampler, _, _ = cli.parse_configs((EngineConfig, SamplerConfig, RewardConfig, EvalConfig),
                                         ["--config", str(cfg), "--stop_strings", "STOP"], "treepo eval")
    assert sampler.stop_strings == ["STOP"]  # the flag overrides the file
    cfg.write_text("sampler:\n  env_args: {max_turns: 2}\n")
    with pytest.raises(ConfigError, match="env_args is set but no env"):
        cli.parse_configs(types, ["--config", str(cfg)], "treepo train")
