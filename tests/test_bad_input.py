"""Bad input a new user hands treepo: each fails in one line naming the file, the key or the field, and the fix.

    .venv/bin/python -m pytest -q tests/test_bad_input.py
"""

from __future__ import annotations

import io as stdio
import sys
from pathlib import Path

import pytest
import requests
from rich.console import Console

import tiny
from treepo.cli import parse_configs
from treepo.config import EngineConfig, JobSamplerConfig, RewardConfig, RolloutConfig, SamplerConfig, TrainConfig
from treepo.errors import ConfigError, InputError, RewardError
from treepo.plugins import load_callable
from treepo.prompts import load_dataset_prompts, load_jsonl

LATIN1 = "caf\u00e9".encode("latin-1")  # b'caf\xe9': not UTF-8


# -- files that are not UTF-8, or start with a byte-order mark ---------------------------------------


def test_a_prompts_jsonl_that_is_not_utf8_names_the_file_the_line_and_the_fix(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "2+2?"}\n{"prompt": "' + LATIN1 + b'"}\n')
    with pytest.raises(InputError) as e:
        load_jsonl(path)
    message = str(e.value)
    assert str(path) in message and "not UTF-8" in message and "line 2" in message and "iconv" in message
    assert "\n" not in message


def test_a_jsonl_starting_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "2+2?", "answer": "4"}\n{"prompt": "3+3?"}\n')
    prompts = load_jsonl(path)
    assert [p.question for p in prompts] == ["2+2?", "3+3?"] and prompts[0].answer == "4"


def test_a_csv_that_is_not_utf8_names_the_cause_with_nothing_printed_before_it(tmp_path, capfd):
    pytest.importorskip("datasets")
    path = tmp_path / "p.csv"
    path.write_bytes(b"prompt,answer\n" + LATIN1 + b",4\n")
    with pytest.raises(InputError) as e:
        load_dataset_prompts(path)
    assert "not UTF-8" in str(e.value) and "line 2" in str(e.value) and str(path) in str(e.value)
    out, err = capfd.readouterr()
    assert not out.strip() and not err.strip()  # no datasets ERROR lines or progress bars


def test_an_unreadable_dataset_file_gives_the_first_cause_and_prints_nothing_else(tmp_path, capfd):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "p.json"
    path.write_text('{"prompt": 1\n')
    bars = datasets.is_progress_bar_enabled()
    with pytest.raises(InputError) as e:
        load_dataset_prompts(path)
    assert "cannot read it as json" in str(e.value) and "DatasetGenerationError" not in str(e.value)
    out, err = capfd.readouterr()
    assert not out.strip() and not err.strip()
    assert datasets.is_progress_bar_enabled() == bars  # the user's setting is put back


# -- YAML configs --------------------------------------------------------------------------------


def _parse(path: Path):
    return parse_configs((EngineConfig, JobSamplerConfig, RolloutConfig), ["--config", str(path)], "treepo rollout")


def test_a_yaml_config_that_is_not_utf8_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"width: 2\n# " + LATIN1 + b"\n")
    with pytest.raises(ConfigError) as e:
        _parse(path)
    assert str(path) in str(e.value) and "not UTF-8" in str(e.value) and "line 2" in str(e.value)


def test_a_yaml_config_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"\xef\xbb\xbfwidth: 2\n")
    assert _parse(path)[1].width == 2


@pytest.mark.parametrize("text, words", [
    ("width: two\n", ["width", "'two'", "not an integer"]),
    ("sampler:\n  width: two\n", ["width", "'two'"]),
    ("top_p: high\n", ["top_p", "not a number"]),
    ("mode: bush\n", ["mode", "tree, independent"]),
    ("ignore_eos: maybe\n", ["ignore_eos", "true or false"]),
])
def test_a_yaml_value_of_the_wrong_type_names_the_file_and_the_key(tmp_path, text, words):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        _parse(path)
    message = str(e.value)
    assert f"config={str(path)!r}" in message and "--" not in message  # the key as written, not a flag
    for w in words:
        assert w in message


# -- user code in the current folder ------------------------------------------------------------------


def test_a_reward_module_in_the_current_folder_imports_without_the_folder_on_sys_path(tmp_path, monkeypatch):
    (tmp_path / "my_reward_here.py").write_text("def score(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])  # as the console script
    fn = load_callable("my_reward_here:score", "reward")
    assert fn([""], ["a", "b"]) == [1.0, 1.0]
    assert sys.path[-1] == str(tmp_path)  # added last: it never shadows an installed package


def test_a_reward_module_that_is_nowhere_says_how_to_make_it_importable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_callable("no_such_reward_module:score", "reward")
    assert "PYTHONPATH" in str(e.value) and "no_such_reward_module.py" in str(e.value)


def test_a_reward_module_missing_a_dependency_says_to_install_it(tmp_path, monkeypatch):
    (tmp_path / "needs_a_dep.py").write_text("import not_an_installed_package\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_callable("needs_a_dep:score", "reward")
    assert "install 'not_an_installed_package'" in str(e.value)


# -- a run stopped before its first row ------------------------------------------------------------


def test_a_run_stopped_by_a_hanging_reward_leaves_no_empty_metrics_file(tmp_path):
    prompts = tiny.write_prompts(tmp_path / "prompts.jsonl", 4)
    out = tmp_path / "run"
    cfgs = (EngineConfig(threads=1), SamplerConfig(width=2, depth=1, segment_len=4),
            RewardConfig(reward="toy_rewards:slow", reward_timeout=0.05),
            TrainConfig(prompts=str(prompts), num_prompts=4, steps=1, prompts_per_step=2, out=str(out),
                        dynamic_sampling=False, tensorboard=False))
    from treepo.train.trainer import run_train

    with pytest.raises(RewardError):
        run_train(*cfgs, model=tiny.model("llama"), tokenizer=tiny.tokenizer(), console=Console(file=stdio.StringIO()))
    assert not (out / "metrics.jsonl").exists()


def test_the_metrics_file_appears_with_its_first_row(tmp_path):
    from treepo.train.metrics_log import MetricsLog, read_rows

    log = MetricsLog(tmp_path, main=True, tensorboard=False)
    assert log.open(None) == [] and not (tmp_path / "metrics.jsonl").exists()
    log.write({"step": 1, "reward_mean": 0.5})
    log.close()
    assert read_rows(tmp_path / "metrics.jsonl") == [{"step": 1, "reward_mean": 0.5}]


# -- servers ---------------------------------------------------------------------------------------


def test_an_unreachable_server_is_described_whole():
    from treepo.engines.server_pool import _describe

    with pytest.raises(requests.ConnectionError) as e:
        requests.get("http://127.0.0.1:9/v1/models", timeout=5)  # port 9 (discard): nothing listens on loopback
    text = _describe(e.value)
    assert text.startswith("connection failed (") and text.endswith(")") and text.count("(") == text.count(")")
    assert "Connection refused" in text


# -- TRL users speak TRL's names ----------------------------------------------------------------------


def _trl_config(tmp_path, **overrides):
    pytest.importorskip("trl")
    from treepo.integrations.trl.config import TreePOConfig

    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                max_completion_length=12, report_to="none", use_cpu=True, bf16=False, save_strategy="no")
    return TreePOConfig(**{**base, **overrides})


def test_trl_root_fan_out_past_the_group_says_num_generations(tmp_path):
    with pytest.raises(ValueError) as e:
        _trl_config(tmp_path, num_generations=4, treepo_init_divergence=5)
    message = str(e.value)
    assert "treepo_init_divergence=5" in message and "num_generations=4" in message and "raise num_generations" in message
    assert "width" not in message


def test_trl_branching_past_the_group_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError) as e:
        _trl_config(tmp_path, num_generations=2, per_device_train_batch_size=2, treepo_branching=4)
    message = str(e.value)
    assert "treepo_branching=4" in message and "num_generations=2" in message
    assert "lower treepo_branching" in message and "raise num_generations" in message


def test_trl_words_translates_flags_to_keyword_arguments():
    pytest.importorskip("trl")
    from treepo.integrations.trl.config import trl_words

    assert trl_words("branching=0: must be an integer >= 1 (e.g. --branching 2).") == \
        "treepo_branching=0: must be an integer >= 1 (e.g. treepo_branching=2)."
    assert trl_words("lower --init_divergence below --depth or raise --depth.") == \
        "lower treepo_init_divergence below treepo_depth or raise treepo_depth."
