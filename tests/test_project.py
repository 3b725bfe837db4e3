"""Project wiring: CI runs exactly the README's test command; every config field is documented."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from treepo.config import EngineConfig, EvalConfig, RewardConfig, RolloutConfig, SamplerConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    first, second = readme_commands()[:2]
    assert first.startswith("bash scripts/setup.sh && ") and "treepo " in first
    assert re.match(r"bash scripts/setup\.sh( --\w+)* && ", second) and "pytest" in second
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == [second]


@pytest.mark.parametrize("cls", [EngineConfig, SamplerConfig, RolloutConfig, RewardConfig, TrainConfig, EvalConfig])
def test_every_config_field_has_help(cls):
    for f in fields(cls):
        assert len(f.metadata.get("help", "")) > 10, f"{cls.__name__}.{f.name} has no help string"
