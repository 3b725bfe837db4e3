"""No silent failures: a run that could not do its job says so in one line and exits non-zero.

Reward functions that fail everywhere, `--resume` with nothing to resume, long work without a word,
leftovers of a killed save, private file modes, messages that point the wrong way, and servers that
outlive the test that started them.
"""

from __future__ import annotations

import hashlib
import io as stdio
import json
import os
import stat
import sys
import textwrap
import time
from pathlib import Path

import pytest
from rich.console import Console

import tiny
import toy_rewards
from treepo import cli, io
from treepo.config import EngineConfig, EvalConfig, RewardConfig, SamplerConfig, TrainConfig
from treepo.engines import local_server
from treepo.engines.local_server import LocalServerProcess, free_port, live_servers
from treepo.engines.memory import kv_cache_bytes
from treepo.engines.transformers_engine import TransformersEngine
from treepo.errors import ConfigError, InputError, RewardError, ServerError
from treepo.progress import progress_bar
from treepo.rollout.sampler import TreeSampler
from treepo.train import checkpoint
from treepo.train.trainer import run_train


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny.save_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def prompts(tmp_path) -> Path:
    return tiny.write_prompts(tmp_path / "prompts.jsonl", 12)


def _train(prompts: Path, out: Path, reward="toy_rewards:letter_share", **train):
    args = dict(prompts=str(prompts), num_prompts=12, steps=1, prompts_per_step=2, micro_batch_size=4,
                learning_rate=1e-3, out=str(out), checkpoint_every=1, tensorboard=False, dynamic_sampling=False)
    args.update(train)
    cfgs = (EngineConfig(threads=1), SamplerConfig(width=4, depth=2, segment_len=8), RewardConfig(reward=reward),
            TrainConfig(**args))
    return run_train(*cfgs, model=tiny.model("llama"), tokenizer=tiny.tokenizer(), console=Console(file=stdio.StringIO()))


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


# -- a reward that fails everywhere stops the run ----------------------------------------------------


def test_train_stops_when_the_reward_fails_on_every_sample_and_keeps_the_last_checkpoint(prompts, tmp_path,
                                                                                         monkeypatch):
    out, reward = tmp_path / "run", "toy_rewards:switchable"
    _train(prompts, out, reward, steps=1)  # a good first step: checkpoint step 1 and model/
    good, model_before = checkpoint.latest_checkpoint(out), _digest(out / "model")
    monkeypatch.setattr(toy_rewards, "BROKEN", True)
    with pytest.raises(RewardError) as failure:
        _train(prompts, out, reward, steps=3, resume=True)
    message = str(failure.value)
    assert "\n" not in message
    assert "reward 'toy_rewards:switchable' failed on 8 of 8 samples (raised 8) of step 2" in message
    assert "first failure: raised: RuntimeError: the grader is down" in message
    assert "fix the error" in message and "checkpoints/step-000001" in message and "--resume" in message
    assert checkpoint.latest_checkpoint(out) == good  # no checkpoint after the failing step
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000001"]
    assert _digest(out / "model") == model_before  # model/ is not rewritten with anything
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_a_fresh_run_whose_reward_always_raises_writes_no_model_and_exits_2(model_dir, prompts, tmp_path, capsys,
                                                                             monkeypatch):
    monkeypatch.setattr(toy_rewards, "BROKEN", True)
    out = tmp_path / "run"
    code = cli.main(["train", "--model", str(model_dir), "--prompts", str(prompts), "--num_prompts", "12",
                     "--steps", "2", "--prompts_per_step", "2", "--width", "4", "--depth", "2", "--segment_len", "4",
                     "--reward", "toy_rewards:switchable", "--no_tensorboard", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    line = next(x for x in err.splitlines() if x.startswith("error:"))
    assert "reward 'toy_rewards:switchable' failed on" in line and "of step 1" in line
    assert "RuntimeError: the grader is down" in line and "no checkpoint had been written yet" in line
    assert not (out / "model").exists() and checkpoint.latest_checkpoint(out) is None


def test_partial_reward_failures_reach_the_summary_and_the_final_line(prompts, tmp_path):
    console = Console(file=stdio.StringIO(), width=300)
    cfgs = (EngineConfig(threads=1), SamplerConfig(width=4, depth=2, segment_len=8),
            RewardConfig(reward="toy_rewards:nan_on_odd"),
            TrainConfig(prompts=str(prompts), num_prompts=12, steps=2, prompts_per_step=2, out=str(tmp_path / "r"),
                        dynamic_sampling=False, tensorboard=False))
    summary = run_train(*cfgs, model=tiny.model("llama"), tokenizer=tiny.tokenizer(), console=console)
    assert summary["reward_failures"] == {"nan": 8}  # half of 2 steps x 8 samples
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["reward_failures"] == {"nan": 8}
    assert "failed on 8 of 16 samples (nan 8)" in console.file.getvalue()


def _eval(model_dir, prompts, out, *extra) -> int:
    return cli.main(["eval", "--model", str(model_dir), "--prompts", str(prompts), "--num_prompts", "2",
                     "--width", "4", "--depth", "2", "--segment_len", "4", "--out", str(out), *extra])


@pytest.mark.parametrize("reward, kind, fix", [
    ("slow", "timeout", "raise --reward_timeout"),
    ("all_nan", "nan", "return finite numbers"),
    ("wrong_count", "bad_output", "one number per completion"),
    ("raises", "raised", "fix the error"),
])
def test_eval_whose_reward_fails_on_every_sample_is_an_error(model_dir, prompts, tmp_path, capsys, reward, kind, fix):
    out = tmp_path / "eval"
    assert _eval(model_dir, prompts, out, "--reward", f"toy_rewards:{reward}", "--reward_timeout", "0.01") == 2
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("error:"))
    assert f"reward 'toy_rewards:{reward}' failed on 8 of 8 samples ({kind} 8) of the evaluation" in line
    assert f"first failure: {kind}: " in line and fix in line and "every sample failed" in line
    assert not out.exists()


def test_eval_shows_partial_failures_and_stops_past_the_share_allowed(model_dir, prompts, tmp_path, capsys):
    out = tmp_path / "eval"
    assert _eval(model_dir, prompts, out, "--reward", "toy_rewards:nan_on_odd") == 0
    summary = json.loads((out / "eval.json").read_text())
    assert summary["reward_failures"] == {"nan": 4} and summary["reward_samples"] == 8
    assert "4 of 8 (nan 4)" in capsys.readouterr().err  # a row of the table
    assert _eval(model_dir, prompts, tmp_path / "strict", "--reward", "toy_rewards:nan_on_odd",
                 "--max_failure_share", "0.25") == 2
    assert "more than 25% failed" in capsys.readouterr().err
    assert not (tmp_path / "strict").exists()
    with pytest.raises(ConfigError, match="max_failure_share=1.5"):
        EvalConfig(max_failure_share=1.5)


# -- --resume with nothing to resume ----------------------------------------------------------------


def test_resume_without_a_checkpoint_is_an_error_and_auto_says_it_starts(prompts, tmp_path):
    with pytest.raises(InputError, match=r"--resume: out='.*typo' does not exist, so there is nothing to resume: "
                                         r"check --out, or pass --resume auto"):
        _train(prompts, tmp_path / "typo", resume=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="has no checkpoint"):
        _train(prompts, tmp_path / "empty", resume=True)
    console = Console(file=stdio.StringIO(), width=300)
    cfgs = (EngineConfig(threads=1), SamplerConfig(width=4, depth=2, segment_len=8), RewardConfig(reward="toy_rewards:letter_share"),
            TrainConfig(prompts=str(prompts), num_prompts=12, steps=1, prompts_per_step=2, out=str(tmp_path / "new"),
                        resume="auto", tensorboard=False))
    run_train(*cfgs, model=tiny.model("llama"), tokenizer=tiny.tokenizer(), console=console)
    assert "--resume auto: no checkpoint in" in console.file.getvalue() and "starting a new run at step 0" in console.file.getvalue()
    assert checkpoint.latest_checkpoint(tmp_path / "new").name == "step-000001"


def test_resume_flag_and_yaml_values(tmp_path):
    from treepo.cli import parse_configs
    from treepo.config import TrainSamplerConfig

    types = (EngineConfig, TrainSamplerConfig, RewardConfig, TrainConfig)
    resume = lambda *argv: parse_configs(types, list(argv), "treepo train")[-1].resume  # noqa: E731
    assert resume() is False and resume("--resume") is True and resume("--resume", "--steps", "3") is True
    assert resume("--resume", "auto") == "auto" and resume("--resume=false") is False
    cfg = tmp_path / "run.yaml"
    for text, value in (("resume: true", True), ("resume: auto", "auto"), ("resume: false", False)):
        cfg.write_text(f"train:\n  {text}\n")
        assert resume("--config", str(cfg)) == value
    with pytest.raises(ConfigError, match="resume='maybe'.*--resume auto"):
        resume("--resume", "maybe")


# -- long work shows its size and its progress; a KV cache that cannot fit is refused ------------------


def test_kv_cache_bytes_by_hand():
    # 2 prompts x width 4 rows, 100 positions, 2 layers x (K, V) x 2 heads x 16 dims x 4 bytes
    assert kv_cache_bytes(rows=8, tokens=100, layers=2, kv_heads=2, head_dim=16, dtype_bytes=4) == 8 * 100 * 2 * 2 * 2 * 16 * 4


def test_a_kv_cache_that_cannot_fit_is_refused_with_its_size():
    engine = TransformersEngine(tiny.model("llama"), tiny.tokenizer(), EngineConfig(threads=1))
    sampler = TreeSampler(SamplerConfig(width=512, depth=4, segment_len=64), engine)
    lengths = [20, 30]
    need = engine.kv_cache_bytes(2 * 512, 30 + 256 + 1)
    assert need == 2 * 512 * 287 * 2 * 2 * 2 * 16 * 4  # tiny llama: 2 layers, 2 kv heads, head dim 16, float32
    plan = sampler.plan(lengths, 8, available=need)  # just fits
    assert plan.kv_bytes == need and plan.most_tokens == 2 * 512 * 256
    assert "2 prompts x width 512 x budget 256 tokens = at most 262,144 response tokens" in plan.describe()
    with pytest.raises(ConfigError, match=r"KV cache of 2 prompts x width 512 x 287 tokens .* needs 143\.5 MiB, more "
                                          r"than the 1\.0 MiB free on cpu: lower --prompt_batch_size \(now 8\)"):
        sampler.plan(lengths, 8, available=1 << 20)
    assert engine.available_memory() > 0  # the real figure: MemAvailable / physical memory


def test_rollout_prints_its_plan_and_refuses_before_work_when_memory_is_short(model_dir, prompts, tmp_path,
                                                                              capsys, monkeypatch):
    base = ["rollout", "--model", str(model_dir), "--prompts", str(prompts), "--num_prompts", "2", "--width", "4",
            "--depth", "2", "--segment_len", "4"]
    assert cli.main(base + ["--out", str(tmp_path / "ok")]) == 0
    err = capsys.readouterr().err
    assert "rollout plan: 2 prompts x width 4 x budget 8 tokens = at most 64 response tokens" in err
    assert "rollout: 0/2 prompts" in err  # a plain progress line: this console is not a terminal
    monkeypatch.setattr(TransformersEngine, "available_memory", lambda self: 1000)
    assert cli.main(base + ["--out", str(tmp_path / "never")]) == 2
    assert "more than the 1000 B free on cpu" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_progress_is_reported_within_a_round_and_as_lines_off_a_terminal():
    engine = TransformersEngine(tiny.model("llama"), tiny.tokenizer(), EngineConfig(threads=1, ignore_eos=True))
    seen: list[str] = []
    engine.on_progress = seen.append
    TreeSampler(SamplerConfig(mode="independent", width=3, depth=1, segment_len=5, rep_count=0), engine).rollout(
        tiny.prompts()[:1])
    assert seen[0] == "token 1/5, 3 paths" and seen[-1].startswith("token 5/5")

    log = Console(file=stdio.StringIO(), width=200)  # a file: not a terminal
    with progress_bar(log, line_every=0.2) as progress:
        task = progress.add_task("rollout", total=4, info="")
        progress.update(task, info="round 1: token 3/64, 512 paths")  # printed at once
        progress.update(task, info="round 1: token 4/64, 512 paths")  # too soon after: not printed
        time.sleep(0.25)
        progress.advance(task, 1)
    lines = [line for line in log.file.getvalue().splitlines() if line.startswith("rollout:")]
    assert len(lines) == 2, lines
    assert lines[0].startswith("rollout: 0/4 prompts, 0 s, round 1: token 3/64, 512 paths")
    assert lines[1].startswith("rollout: 1/4 prompts")


# -- a killed save's leftovers go at the next start ---------------------------------------------------


def test_stale_temporary_checkpoint_folders_are_removed_when_the_run_starts_again(prompts, tmp_path):
    out = tmp_path / "run"
    _train(prompts, out, steps=1)
    stale = [out / "checkpoints" / ".step-000002.x1y2.tmp", out / ".model.abc.tmp"]
    for folder in stale:
        (folder / "model").mkdir(parents=True)
        (folder / "model" / "model.safetensors").write_bytes(b"\0" * 1000)  # a save killed half-way
    _train(prompts, out, steps=1, resume=True)  # nothing left to train: no save runs, the start cleans up
    assert not any(p.exists() for p in stale)


def test_a_kill_between_the_model_renames_puts_the_previous_model_back(tmp_path):
    (tmp_path / ".model.old").mkdir()
    (tmp_path / ".model.old" / "config.json").write_text("{}")
    assert checkpoint.remove_stale(tmp_path) == []
    assert (tmp_path / "model" / "config.json").is_file() and not (tmp_path / ".model.old").exists()


# -- outputs get the modes the umask gives ------------------------------------------------------------


@pytest.fixture
def umask_002(monkeypatch):
    old = os.umask(0o002)
    monkeypatch.setattr(io, "_UMASK", None)  # read afresh
    yield
    os.umask(old)


def test_checkpoints_model_and_outputs_respect_the_umask(prompts, tmp_path, umask_002):
    out = tmp_path / "run"
    _train(prompts, out, steps=1)
    paths = [out / "model", out / "model" / "model.safetensors", out / "checkpoints" / "step-000001",
             out / "checkpoints" / "step-000001" / "model" / "model.safetensors",
             out / "checkpoints" / "step-000001" / "optimizer.pt", out / "summary.json", out / "metrics.jsonl"]
    modes = {p.relative_to(out).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in paths}
    assert modes == {k: ("0o775" if (out / k).is_dir() else "0o664") for k in modes}
    with io.staged_dir(tmp_path / "staged") as stage:
        io.write_json(stage / "eval.json", {})
    assert oct(stat.S_IMODE((tmp_path / "staged" / "eval.json").stat().st_mode)) == "0o664"


# -- messages that name the right fix -----------------------------------------------------------------


def test_a_run_or_checkpoint_folder_as_model_points_to_its_model(prompts, tmp_path, capsys):
    out = tmp_path / "run"
    _train(prompts, out, steps=1)
    step = out / "checkpoints" / "step-000001"
    for folder in (step, out):
        assert cli.main(["eval", "--model", str(folder), "--prompts", str(prompts), "--out", str(tmp_path / "e")]) == 2
        assert f"pass --model {folder / 'model'}" in capsys.readouterr().err.replace("\n", "")


# -- servers never outlive the test (or the process) that started them --------------------------------

NEVER_ANSWERS = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)"
ANSWERS = textwrap.dedent("""
    import http.server, subprocess, sys
    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])  # a child of the server
    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b'{}')
        def log_message(self, *a):
            pass
    http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), Ok).serve_forever()
""")


def _group_gone(pgid: int) -> bool:
    return not local_server._group_running(pgid)


def test_a_server_that_never_answers_is_killed_with_its_children():
    with pytest.raises(ServerError, match="did not answer .* within 1 s"):
        LocalServerProcess([sys.executable, "-c", NEVER_ANSWERS], f"http://127.0.0.1:{free_port()}",
                           startup_timeout=1.0)
    assert live_servers() == []


def test_an_interrupt_during_start_up_kills_the_server(monkeypatch):
    started = []
    real_popen = local_server.subprocess.Popen

    def popen(*a, **k):
        started.append(real_popen(*a, **k))
        return started[-1]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(local_server.subprocess, "Popen", popen)
    monkeypatch.setattr(local_server.requests, "get", interrupted)
    with pytest.raises(KeyboardInterrupt):
        LocalServerProcess([sys.executable, "-c", NEVER_ANSWERS], "http://127.0.0.1:9", startup_timeout=30)
    assert started and started[0].poll() is not None and _group_gone(started[0].pid)
    assert live_servers() == []


def test_a_server_that_exits_while_starting_is_an_error(tmp_path):
    with pytest.raises(ServerError, match="exited with status 3 while starting; see .*log"):
        LocalServerProcess([sys.executable, "-c", "import sys; sys.exit(3)"], "http://127.0.0.1:9",
                           log_path=tmp_path / "server.log")
    assert live_servers() == []


def test_stop_ends_the_server_and_its_children():
    port = free_port()
    with LocalServerProcess([sys.executable, "-c", ANSWERS, str(port)], f"http://127.0.0.1:{port}",
                            probe="/", startup_timeout=30) as server:
        assert live_servers() == [server.process.pid]
    assert live_servers() == [] and _group_gone(server.process.pid)
