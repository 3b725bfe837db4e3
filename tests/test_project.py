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


# The pipeline's stages, in order: a module may import from its own stage and from earlier ones only.
STAGES = {"": 0, "engines": 1, "envs": 1, "viz": 1, "rollout": 2, "rewards": 3, "eval": 4, "train": 5,
          "gpu_check": 6,  # the GPU check exercises the whole pipeline
          "integrations": 6}  # adapters to other trainers (TRL) drive the pipeline as the CLI does
TOP = {"tiny": 5.5, "cli": 6, "__init__": 7}  # test helpers (tiny models, samples) over train; the command and the public names above all


def _stage(module: str) -> tuple[str, int]:
    """(package, stage) of a dotted module name under treepo ('' for the top-level base modules)."""
    parts = module.split(".")[1:]
    if not parts:
        return "", TOP["__init__"]
    if len(parts) == 1 and parts[0] in TOP:
        return "", TOP[parts[0]]
    package = parts[0] if parts[0] in STAGES else ""
    return package, STAGES[package]


def _imports(path: Path) -> list[str]:
    import ast

    src = ROOT / "src"
    module = ".".join(path.relative_to(src).with_suffix("").parts).removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            found += [n for n in names if n == "treepo" or n.startswith("treepo.")]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("treepo.")]
    return [module] + found


def test_imports_run_down_the_pipeline_never_back_up():
    bad = []
    for path in sorted((ROOT / "src" / "treepo").rglob("*.py")):
        module, *targets = _imports(path)
        package, stage = _stage(module)
        for target in targets:
            t_package, t_stage = _stage(target)
            if t_package != package and t_stage >= stage:
                bad.append(f"{module} imports {target}")
    assert not bad, "imports that run back up the pipeline:\n" + "\n".join(bad)


def test_the_core_package_never_imports_trl():
    """Every module but treepo.integrations.* (and its shared rows) imports with TRL, verl and Ray made unimportable
    (optional extras)."""
    import subprocess
    import sys

    modules = sorted(
        ".".join(p.relative_to(ROOT / "src").with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / "src" / "treepo").rglob("*.py")
        if not p.relative_to(ROOT / "src" / "treepo").as_posix().startswith("integrations/")
        or p.name == "__init__.py" and p.parent.name == "integrations"
        or p.name == "rows.py" and p.parent.name == "integrations"
    )
    modules = [m for m in modules if not m.endswith("__main__")]
    code = ("import importlib, sys\nfor extra in ('trl', 'verl', 'ray'):\n    sys.modules[extra] = None\n"
            f"for m in {modules!r}:\n    importlib.import_module(m)\n"
            "assert sys.modules['trl'] is None and sys.modules['verl'] is None\nprint('ok', len(sys.argv))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "src")}, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
    assert "treepo.integrations" in modules and "treepo.cli" in modules
