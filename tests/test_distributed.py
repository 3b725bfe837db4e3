"""Multi-process training through `accelerate launch` on CPU (gloo): sharded prompts, averaged gradients."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny

HERE = Path(__file__).parent
ACCELERATE = Path(sys.executable).parent / "accelerate"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(processes: int, script_args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    if processes == 1:
        cmd = [sys.executable, *script_args]
    else:
        cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
               "--main_process_port", str(_port()), *script_args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=HERE.parent)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


@pytest.fixture
def prompts(tmp_path) -> Path:
    return tiny.write_prompts(tmp_path / "prompts.jsonl", 8)


@pytest.mark.parametrize("packing", [1, 0])
def test_two_processes_reach_the_parameters_of_one(prompts, tmp_path, packing):
    """Same global batch (4 prompts; 2 per rank), one step: the parameters agree within 1e-5."""
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        _launch(n, [str(HERE / "dist_train.py"), "--prompts", str(prompts), "--out", str(out),
                    "--packing", str(packing)])
        runs[n] = torch.load(out / "params-rank0.pt")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 1 and rows[0]["prompts_rolled"] == 4 and rows[0]["groups_trained"] == 4
        assert rows[0]["trajectories_per_prompt"] == 4
    start = tiny.model("llama").state_dict()
    moved = 0
    for name, one in runs[1].items():
        two = runs[2][name]
        assert torch.allclose(one, two, atol=1e-5, rtol=0), name
        moved += int(not torch.equal(one, start[name]))
    assert moved > 0


def test_a_rank_without_groups_still_joins_the_update(prompts, tmp_path):
    """3 prompts on 2 ranks in 3 mini-batches: rank 1 holds one group, so in the second update it joins
    the gradient all-reduce with zeros, and the third (no group on any rank) is skipped by both."""
    out = tmp_path / "run"
    _launch(2, [str(HERE / "dist_train.py"), "--prompts", str(prompts), "--out", str(out),
                "--prompts-per-step", "3", "--mini-batches", "3"])
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["groups_trained"] == 3 and row["prompts_rolled"] == 3
    assert row["skipped_updates"] == 0 and row["grad_norm"] > 0
    rank0, rank1 = torch.load(out / "params-rank0.pt"), torch.load(out / "params-rank1.pt")
    start = tiny.model("llama").state_dict()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # the replicas never drift apart
    assert any(not torch.equal(rank0[k], start[k]) for k in start)


def test_treepo_train_under_accelerate_launch(tmp_path, prompts):
    """The real command with real rollouts on 2 ranks: prompts sharded, one metrics file, the model written."""
    model_dir = tiny.save_model_dir(tmp_path / "tiny-model")
    out = tmp_path / "run"
    res = _launch(2, ["-m", "treepo.cli", "train", "--model", str(model_dir), "--prompts", str(prompts),
                      "--reward", "toy_rewards:letter_share", "--num_prompts", "8", "--steps", "2",
                      "--prompts_per_step", "4", "--width", "4", "--depth", "2", "--segment_len", "6",
                      "--micro_batch_size", "4", "--learning_rate", "1e-3", "--threads", "1",
                      "--max_resample_rounds", "1", "--tensorboard", "false", "--out", str(out)])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2], res.stderr[-2000:]
    assert all(r["prompts_rolled"] >= 4 and r["trajectories_per_prompt"] == 4 for r in rows)
    assert (out / "model" / "config.json").is_file() and (out / "summary.json").is_file()
