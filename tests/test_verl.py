"""The verl adapter's suite (tests/verl_plugin) in its own environment, .venv-verl (scripts/setup_verl.sh): verl pins
transformers below the core's. Skips when .venv-verl is missing, fails instead under TREEPO_REQUIRE_SERVER=1
(the README's test command, whose setup builds it)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv-verl" / "bin" / "python"


def test_the_verl_adapter_suite_passes_in_its_environment():
    if not PYTHON.exists():
        if os.environ.get("TREEPO_REQUIRE_SERVER") == "1":
            pytest.fail("TREEPO_REQUIRE_SERVER=1 but .venv-verl is missing: run bash scripts/setup.sh --server (or --verl).")
        pytest.skip(".venv-verl is missing: bash scripts/setup.sh --verl builds it")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out = subprocess.run([str(PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/verl_plugin",
                          "-W", "ignore::UserWarning", "-W", "ignore::DeprecationWarning"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    tail = (out.stdout + out.stderr)[-4000:]
    assert out.returncode == 0, f"tests/verl_plugin failed in .venv-verl:\n{tail}"
    assert " passed" in out.stdout and " skipped" not in out.stdout.splitlines()[-1], tail
