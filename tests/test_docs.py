"""The docs cannot drift: every flag has help, every flag a page names exists, tables come from JSON, the site builds.

    .venv/bin/python -m pytest -q tests/test_docs.py

Skipped without mkdocs only when TREEPO_REQUIRE_SERVER is unset (CI and the README's test command
set it, so there a missing mkdocs fails).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
QUIET = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's banner about MkDocs 2


def _hooks():
    spec = importlib.util.spec_from_file_location("treepo_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = _hooks()


def _pages() -> list[Path]:
    return sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]


@pytest.mark.parametrize("cls", sorted({c for types in hooks.command_configs().values() for c in types},
                                       key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_every_flag_of_every_command_has_a_help_string(cls):
    missing = [f.name for f in dataclasses.fields(cls) if len(f.metadata.get("help", "").strip()) < 10]
    assert not missing, f"{cls.__name__}: fields without a help string: {', '.join(missing)}"


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.name)
def test_every_flag_a_page_names_exists(page):
    bad = hooks.unknown_flags(page.read_text(encoding="utf-8"))
    assert not bad, f"{page.relative_to(ROOT)} names flags no treepo command has: {', '.join(bad)}"


def test_the_flag_check_treats_dash_and_underscore_alike_and_catches_a_typo():
    assert hooks.unknown_flags("use --segment-len 4 or --segment_len 4, --no_packing, --config x.yaml") == []
    assert hooks.unknown_flags("use --segmnt-len 4") == ["--segmnt-len"]
    with pytest.raises(hooks.DocsError, match="docs/x.md: names --widht"):
        hooks.render_page("set --widht 4", "docs/x.md")


def test_the_cli_reference_lists_every_field_of_every_command():
    text = hooks.cli_reference()
    for command, types in hooks.command_configs().items():
        assert f"## treepo {command}" in text
        for cls in types:
            for f in dataclasses.fields(cls):
                assert f"`--{f.name}`" in text
                assert hooks._cell(f.metadata["help"]) in text


def test_a_missing_benchmark_json_or_key_fails_naming_the_page(tmp_path):
    with pytest.raises(hooks.DocsError, match=r"docs/benchmarks.md: table 'rollout_speed' needs "
                                             r"benchmarks/results/rollout_speed.json, which is missing"):
        hooks.render_page("<!-- table: rollout_speed -->", "docs/benchmarks.md", results=tmp_path)
    (tmp_path / "treepo_vs_grpo.json").write_text("{}")
    with pytest.raises(hooks.DocsError, match=r"docs/b.md: table 'treepo_vs_grpo': .* has no 'tasks'"):
        hooks.render_page("<!-- table: treepo_vs_grpo -->", "docs/b.md", results=tmp_path)


def test_tables_render_new_keys_when_present_and_a_dash_when_an_optional_one_is_missing(tmp_path):
    (tmp_path / "rollout_speed.json").write_text(json.dumps({"eos_on_rows": [
        {"task": "letter_counting", "answers": "short", "width": 8, "measured_saving": 0.25, "speedup": 1.5,
         "tree": {"decoded_tokens": 900, "wall_seconds": 10.0, "mean_response_tokens": 40.0,
                  "weighted_response_tokens": 42.5, "distinct_leaves_per_group": 6.5},
         "independent": {"decoded_tokens": 1200, "wall_seconds": 15.0, "mean_response_tokens": 41.0}},
        {"task": "chain_sum", "width": 16, "tree": {}, "independent": {}},
    ]}))
    text = hooks.render_page("<!-- table: rollout_speed_eos_on -->", "docs/b.md", results=tmp_path)
    assert "| letter_counting | short | 8 | 900 / 1,200 | 40.0 / 41.0 | 42.5 | 6.5 | 10.0 / 15.0 | 25.0% | 1.50x |" in text
    assert "| chain_sum | — | 16 | — / — | — / — | — | — |" in text
    (tmp_path / "treepo_vs_grpo.json").write_text(json.dumps({"tasks": {"t": {
        "grpo": {"seeds": [0, 1], "acc_after_mean": 0.5},
        "treepo_default": {"seeds": [0, 1], "acc_after_mean": 0.4, "acc_at_grpo_budget_mean": 0.45,
                           "decoded_tokens_mean": 6100.0, "steps_mean": 9.5}}}}))
    text = hooks.render_page("<!-- table: treepo_vs_grpo -->", "docs/b.md", results=tmp_path)
    assert "| t | treepo_default | 2 | — | 40.0% | — | 45.0% | 6,100 | 9.5 | — | — |" in text
    (tmp_path / "seed_table.json").write_text(json.dumps({"rows": [{"seed": 0, "acc": 0.5}, {"seed": 1, "extra": "x"}]}))
    text = hooks.render_page("<!-- table: seed_table -->", "docs/b.md", results=tmp_path)
    assert "| seed | acc | extra |" in text and "| 1 | — | x |" in text


def test_every_committed_table_renders():
    for name, (filename, _) in hooks.TABLES.items():
        if (hooks.RESULTS / filename).is_file():
            assert "|---|" in hooks.render_table(name, "test")


def _mkdocs() -> list[str]:
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        if os.environ.get("TREEPO_REQUIRE_SERVER"):
            pytest.fail("mkdocs / mkdocs-material are not installed: pip install -e '.[dev]'")
        pytest.skip("mkdocs / mkdocs-material are not installed (pip install -e '.[dev]')")
    return [sys.executable, "-m", "mkdocs"]


def test_the_site_builds_in_strict_mode(tmp_path):
    site = tmp_path / "site"
    run = subprocess.run([*_mkdocs(), "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env=QUIET)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (site / "cli" / "index.html").is_file() and (site / "benchmarks" / "index.html").is_file()
    cli = (site / "cli" / "index.html").read_text(encoding="utf-8")
    assert 'id="train-trainconfig"' in cli and "<code>--segment_len</code>" in cli and "<!-- cli-reference" not in cli
    assert "<!-- table:" not in (site / "benchmarks" / "index.html").read_text(encoding="utf-8")


def test_a_broken_link_fails_the_strict_build(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(DOCS, copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    (copy / "benchmarks").symlink_to(ROOT / "benchmarks")
    page = copy / "docs" / "evaluation.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no_such_page.md).\n")
    run = subprocess.run([*_mkdocs(), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=copy,
                         capture_output=True, text=True, timeout=120, env=QUIET)
    assert run.returncode != 0 and "no_such_page.md" in run.stdout + run.stderr
