"""The GPU recipe (examples/verl/treepo_qwen2_5.sh) composes with verl's own config and passes treepo's start-up
check for both backends; a backend without token-id generation is refused by the same check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "verl" / "treepo_qwen2_5.sh"


def _check(backend: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TREEPO_CHECK_ONLY": "1", "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), backend], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("backend", ["vllm", "sglang"])
def test_the_recipe_composes_and_passes_the_start_up_check(backend):
    out = _check(backend)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    assert "config ok: width 16, 14 segments of 512 tokens" in out.stdout


def test_the_recipe_with_a_backend_treepo_has_not_checked_is_refused():
    out = _check("trtllm")
    assert out.returncode == 2 and "actor_rollout_ref.rollout.name=trtllm" in out.stdout
