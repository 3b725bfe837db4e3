"""MkDocs hooks: the parts of the docs that are generated, so they cannot drift from the code.

    .venv/bin/mkdocs build --strict        # or: .venv/bin/mkdocs serve

- `<!-- cli-reference -->` becomes the reference of every `treepo` command's flags, from the config
  dataclasses' fields and help strings (`treepo.cli.COMMAND_CONFIGS`);
- `<!-- table: NAME -->` becomes a table rendered from `benchmarks/results/*.json` (TABLES below);
  a missing JSON file, or a key a table cannot do without, fails the build naming the page;
- every page is checked for `--flags` that no command has (OTHER_FLAGS lists the other tools' own).

tests/test_docs.py imports this file to run the same checks and builds the site in strict mode.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MISSING = "—"  # a figure the JSON does not hold (yet)


class DocsError(Exception):
    """A generated part of a page cannot be built; the message names the page and what is missing."""


# -- flags -----------------------------------------------------------------------------------------

# Flags of other tools that the docs name (`-` and `_` count alike), each with the tool that has it.
OTHER_FLAGS = {
    "config", "help",  # every treepo command: --config FILE.yaml, --help
    "max_png_trees", "terminal_trees", "out",  # treepo show's own
    "server", "verl",  # scripts/setup.sh --server, --verl
    "cpu_dry_run",  # scripts/gpu_check.sh
    "repeats", "only", "tasks", "seeds", "eos_prompts", "answers", "max_runs", "budget_scale",  # benchmarks/*.py
    "tiny",  # examples/trl_treepo.py
    "no_deps",  # pip install --no-deps
    "strict", "site_dir",  # mkdocs build
    "multi_gpu", "num_processes",  # accelerate launch
    "parallel", "port", "model_path", "enable_prompt_tokens_details", "enable_cache_report",  # the servers'
    "logprobs_mode", "enable_deterministic_inference", "weight_transfer_config",  # (llama-server, vLLM, SGLang)
}
# A whole lower-case token: `--no_NAME` or `--NAME` (placeholders) are not flags.
FLAG = re.compile(r"(?<![\w/.-])--([a-z][a-z0-9]*(?:[-_][a-z0-9]+)*)(?![\w-])")


def command_configs() -> dict[str, tuple]:
    from treepo.cli import COMMAND_CONFIGS

    return COMMAND_CONFIGS


def config_flags() -> set[str]:
    """Every flag a treepo command accepts, `_`-spelled (a bool that defaults on also has --no_NAME)."""
    names = set()
    for types in command_configs().values():
        for cls in types:
            for f in dataclasses.fields(cls):
                names.add(f.name)
                if f.default is True:
                    names.add(f"no_{f.name}")
    return names


def unknown_flags(text: str) -> list[str]:
    """The `--flags` in `text` that neither a treepo command nor a tool in OTHER_FLAGS has."""
    known = config_flags() | OTHER_FLAGS
    return sorted({f"--{m}" for m in FLAG.findall(text) if m.replace("-", "_") not in known})


# -- the CLI reference -------------------------------------------------------------------------------


def _type_text(cls, f: dataclasses.Field) -> str:
    hint = typing.get_type_hints(cls)[f.name]
    choices = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Literal:
        return " / ".join(f"`{c}`" for c in choices)
    if typing.get_origin(hint) is typing.Union and len(choices) == 1:
        hint = choices[0]
    if typing.get_origin(hint) is list:
        return "list"
    return getattr(hint, "__name__", str(hint))


def _default_text(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        value = f.default
    if value is None or value == [] or value == "":
        return "unset"
    return f"`{value}`"


def _cell(text: str) -> str:
    """Text for a table cell: pipes escaped, one line, and `{` as an entity (attr_list would read `{...}` at a
    cell's end as HTML attributes and drop it)."""
    return text.replace("|", "\\|").replace("\n", " ").replace("{", "&#123;")


def cli_reference() -> str:
    """Markdown: per command, per config dataclass, a table of its flags, types, defaults and help."""
    out = []
    for command, types in command_configs().items():
        out.append(f"## treepo {command}\n")
        out.append(f"`treepo {command} [--config FILE.yaml] [--NAME value ...]`: "
                   + ", ".join(f"[{cls.__name__}](#{command}-{cls.__name__.lower()})" for cls in types) + ".\n")
        for cls in types:
            doc = (cls.__doc__ or "").strip().splitlines()[0]
            out.append(f"### {cls.__name__} {{#{command}-{cls.__name__.lower()}}}\n")
            out.append(f"{doc} (`treepo.config.{cls.__name__}`)\n")
            out.append("| flag | type | default | what |\n|---|---|---|---|")
            for f in dataclasses.fields(cls):
                help_text = f.metadata.get("help", "")
                flag = f"`--{f.name}`" + (f" / `--no_{f.name}`" if f.default is True else "")
                out.append(f"| {flag} | {_cell(_type_text(cls, f))} | {_cell(_default_text(f))} | {_cell(help_text)} |")
            out.append("")
    return "\n".join(out)


# -- benchmark tables ----------------------------------------------------------------------------------


def _get(data: Any, *path, default: Any = MISSING) -> Any:
    for key in path:
        if isinstance(data, dict) and key in data:
            data = data[key]
        elif isinstance(data, list) and isinstance(key, int) and -len(data) <= key < len(data):
            data = data[key]
        else:
            return default
    return data


def _need(data: Any, *path) -> Any:
    value = _get(data, *path, default=None)
    if value is None:
        raise KeyError(".".join(str(p) for p in path))
    return value


def _num(value: Any, fmt: str = ",.0f") -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else MISSING


def _pct(value: Any, digits: int = 1) -> str:
    return f"{value * 100:.{digits}f}%" if isinstance(value, (int, float)) else MISSING


def _times(value: Any) -> str:
    return f"{value:.2f}x" if isinstance(value, (int, float)) else MISSING


def _pair(left: dict, right_side: dict, key: str, fmt: str = ",.0f", right: str = "") -> str:
    """'a / b': `key` of the left dict and (`right` or `key`) of the right one."""
    return f"{_num(left.get(key), fmt)} / {_num(right_side.get(right or key), fmt)}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(str(c)) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _source(data: dict, name: str) -> str:
    command = data.get("command") or _get(data, "setup", "command", default=None)
    where = f"`benchmarks/results/{name}.json`"
    return f"\n\n*Rendered from {where}*" + (f" *(written by `{command}`)*." if command else ".")


def rollout_speed(data: dict) -> str:
    rows = []
    for w in ("w8", "w16"):
        tree, indep = _need(data, w, "tree"), _need(data, w, "independent")
        rows.append([f"w={w[1:]}", _times(data.get(f"speedup_{w}")), _pct(data.get(f"saving_{w}")),
                     _pct(data.get(f"bound_{w}")), _pair(tree, indep, "decoded_tokens"),
                     _pair(tree, indep, "wall_seconds", ".1f")])
    table = _table(["width", "speedup", "decoded-token saving", "structural bound",
                    "decoded tokens, tree / independent", "wall s, tree / independent"], rows)
    engine = (f"\n\nEmbedded engine vs HF `generate` (batch 16, 128 new tokens): "
              f"{_num(data.get('engine_tokens_per_s'), '.1f')} vs {_num(data.get('generate_tokens_per_s'), '.1f')} "
              f"tokens/s ({_times(data.get('engine_vs_generate'))}).")
    setup = (f"{data.get('prompts', MISSING)} prompts, depth {data.get('depth', MISSING)} x "
             f"{data.get('segment_len', MISSING)} tokens, b={data.get('branching', MISSING)}, EOS ignored. ")
    return setup + "\n\n" + table + engine + _source(data, "rollout_speed")


def rollout_speed_eos_on(data: dict) -> str:
    rows = data.get("eos_on_rows")
    if rows is None:  # the older single measurement
        rows = [dict(_need(data, "eos_on"), width=_get(data, "eos_on", "width"))]
    header = ["task", "answers", "width", "decoded tokens, tree / indep.", "mean answer tokens, tree (raw) / indep.",
              "weighted, tree", "distinct leaves (tree)", "wall s, tree / indep.", "measured saving", "speedup"]
    body = []
    for r in rows:
        tree, indep = r.get("tree", {}), r.get("independent", {})
        body.append([r.get("task", MISSING), r.get("answers", MISSING), r.get("width", MISSING),
                     _pair(tree, indep, "decoded_tokens"), _pair(tree, indep, "mean_response_tokens", ".1f"),
                     _num(tree.get("weighted_response_tokens"), ".1f"),
                     _num(tree.get("distinct_leaves_per_group", tree.get("distinct_leaves")), ".1f"),
                     _pair(tree, indep, "wall_seconds", ".1f"), _pct(r.get("measured_saving")), _times(r.get("speedup"))])
    commands = data.get("commands_eos_on_rows") or [data.get("command_eos_on")]
    return _table(header, body) + _source({"command": " ; ".join(c for c in commands if c) or None}, "rollout_speed")


def treepo_vs_grpo(data: dict) -> str:
    tasks = _need(data, "tasks")
    header = ["task", "variant", "seeds", "held-out before", "after: mean [95% interval]", "by seed",
              "at GRPO's token budget", "decoded tokens", "steps", "distinct leaves / group", "wall s"]
    body, versus = [], []
    for task, variants in tasks.items():
        for name, v in variants.items():
            if name == "default_vs_grpo":  # the comparison line under the table, not a variant
                saving = v.get("decoded_saving")
                tokens = (f"{_pct(abs(saving))} {'fewer' if saving >= 0 else 'more'} decoded tokens"
                          if isinstance(saving, (int, float)) else f"decoded tokens {MISSING}")
                diff = v.get("acc_at_grpo_budget_difference", v.get("acc_after_difference"))
                versus.append(f"- {task}: the default against GRPO: {tokens}, held-out accuracy at GRPO's token "
                              f"budget {_num(_times100(diff), '+.1f')} points.")
                continue
            ci = v.get("acc_after_ci")  # a t interval can reach below 0: shown cut at 0
            interval = (f"[{_pct(max(ci[0], 0.0))}, {_pct(min(ci[1], 1.0))}]"
                        if isinstance(ci, list) and len(ci) == 2 and all(isinstance(c, (int, float)) for c in ci)
                        else "")
            by_seed = ", ".join(_pct(a) for a in v.get("acc_after_by_seed") or []) or MISSING
            seeds = v.get("seeds")
            body.append([task, name, len(seeds) if isinstance(seeds, list) else (seeds if seeds is not None else MISSING),
                         _pct(v.get("acc_before_mean")), f"{_pct(v.get('acc_after_mean'))} {interval}".strip(), by_seed,
                         _pct(v.get("acc_at_grpo_budget_mean")), _num(v.get("decoded_tokens_mean")),
                         _num(v.get("steps_mean"), ".1f"), _num(v.get("distinct_leaves_per_group_mean"), ".1f"),
                         _num(v.get("wall_seconds_mean"))])
    notes = ("\n\n" + "\n".join(versus)) if versus else ""
    return _table(header, body) + notes + _source(data, "treepo_vs_grpo")


def _times100(value: Any) -> Any:
    return value * 100 if isinstance(value, (int, float)) else None


def seed_table(data: Any) -> str:
    """Any table-shaped JSON: a list of rows, or {'rows': [...]}, columns in first-seen order."""
    rows = data.get("rows") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise KeyError("rows (a list of objects)")
    header = list(dict.fromkeys(k for r in rows for k in r))
    body = [[_plain(r.get(k, MISSING)) for k in header] for r in rows]
    return _table(header, body) + _source(data if isinstance(data, dict) else {}, "seed_table")


def _plain(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def server_rollout(data: dict) -> str:
    header = ["", "w=8", "w=16"]
    ws = [_need(data, "w8"), _need(data, "w16")]

    def pair(side_key: str, key: str) -> list[str]:
        return [f"{_num(_get(w, 'tree_tokens', key, default=None))} / {_num(_get(w, 'independent_tokens', key, default=None))}"
                for w in ws]

    body = [
        ["wall time, independent / tree (median)"] + [_times(data.get(k)) for k in ("speedup_w8", "speedup_w16")],
        ["repeats"] + [", ".join(_times(s) for s in w.get("speedups", [])) or MISSING for w in ws],
        ["decoded tokens, tree / independent"] + pair("", "decoded"),
        ["prompt tokens sent, tree / independent"] + pair("", "prompt"),
        ["of those, from the slots' prompt caches"] + pair("", "cached_prompt"),
        ["prompt tokens evaluated, tree / independent"] + pair("", "evaluated_prompt"),
        ["decoded-token saving"] + [_pct(data.get(k)) for k in ("saving_w8", "saving_w16")],
    ]
    setup = (f"{data.get('kind', MISSING)} server; {data.get('prompts', MISSING)} prompts, depth {data.get('depth', MISSING)} "
             f"x {data.get('segment_len', MISSING)} tokens, b={data.get('branching', MISSING)}, "
             f"`--parallel {data.get('parallel', MISSING)}`, {data.get('concurrency', MISSING)} requests in flight.\n\n")
    return setup + _table(header, body) + _source(data, "server_rollout")


def packed_training(data: dict) -> str:
    ws = [w for w in ("w16", "w8") if w in data]
    if not ws:
        raise KeyError("w16 or w8")
    header = [""] + [f"w={w[1:]}" for w in ws]
    body = [
        ["packed vs flat speed (median of per-tree ratios)"] + [_times(data.get(f"speedup_{w}")) for w in ws],
        ["seconds per tree, packed / flat"] + [f"{_num(data[w].get('packed_seconds_median'), '.1f')} / "
                                               f"{_num(data[w].get('flat_seconds_median'), '.1f')}" for w in ws],
        ["unique / flat tokens"] + [_num(data.get(f"token_ratio_{w}"), ".3f") for w in ws],
        ["trajectories"] + [_num(data[w].get("trajectories")) for w in ws],
    ]
    if all(f"blocks_vs_dense_speedup_{w}" in data for w in ws):
        body.insert(2, ["block mask vs dense mask speed"] + [_times(data[f"blocks_vs_dense_speedup_{w}"]) for w in ws])
    text = _table(header, body) + _source(data, "packed_training")
    scale = data.get("scale")
    if scale:
        rows = [[path, _num(scale[path].get("max_tokens")), _num(scale[path].get("peak_gb"), ".1f"),
                 _num(scale[path].get("seconds"), ".0f"), _num(scale[path].get("first_failure_tokens"))]
                for path in ("flex", "dense", "flat") if path in scale]
        text += (f"\n\nAt scale (`benchmarks/packed_scale.py`; {scale.get('model', MISSING)}; memory capped at "
                 f"{_num(scale.get('cap_gb'), 'g')} GB; 'flex': {scale.get('flex_path', MISSING)}); largest packed "
                 f"log-prob difference of flex against dense or flat: {_num(data.get('flex_max_logprob_diff'), '.2g')}:"
                 "\n\n" + _table(["path", "largest tree run (unique tokens)", "its peak memory (GB)",
                                  "its forward + backward (s)", "first size that failed"], rows)
                 + f"\n\nCommand: `{data.get('scale_command', MISSING)}`")
    return text


def sampler_bias(data: dict) -> str:
    settings = {"independent": _need(data, "independent"), **_need(data, "settings")}
    header = ["sampler", "accuracy on leaves", "leaf-weighted [95% CI]", "mean leaf tokens", "saving vs own leaves",
              "decoded tokens", "groups dropped", "fallbacks / tree"]
    body = []
    for name, s in settings.items():
        ci = s.get("accuracy_weighted_ci")
        weighted = _num(s.get("accuracy_weighted"), ".3f")
        if isinstance(ci, list) and len(ci) == 2:
            weighted += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
        body.append([name, _num(s.get("accuracy_raw"), ".3f"), weighted, _num(s.get("mean_leaf_tokens"), ".1f"),
                     _pct(s.get("saving_vs_own_leaves")), _num(s.get("decoded_tokens")), _pct(s.get("dropped_groups")),
                     _num(s.get("fallbacks_per_tree"), ".2f")])
    truth = (f"Truth: accuracy {_num(data.get('truth_accuracy'), '.3f')}; {data.get('prompts', MISSING)} prompts, "
             f"w={data.get('width', MISSING)}, b={data.get('branching', MISSING)}, budget "
             f"{data.get('budget_tokens', MISSING)} tokens.\n\n")
    return truth + _table(header, body) + _source(data, "sampler_bias")


def trl_adapter(data: dict) -> str:
    arms = [("TRL GRPOTrainer", "grpo_trainer"), ("TreePOTrainer", "treepo_trainer"), ("`treepo train`", "treepo_train")]
    base = _get(data, "grpo_trainer", "completion_tokens_per_second", default=None)
    header = ["arm", "s / step", "completion tokens / step", "completion tokens / s", "vs GRPOTrainer",
              "decoded tokens / step", "peak RSS GB"]
    body = []
    for label, key in arms:
        arm = _need(data, key)
        rate = arm.get("completion_tokens_per_second")
        body.append([label, _num(arm.get("seconds_per_step"), ".1f"), _num(arm.get("completion_tokens_per_step")),
                     _num(rate, ".1f"), _times(rate / base) if isinstance(rate, (int, float)) and base else MISSING,
                     _num(arm.get("decoded_tokens_per_step")), _num(arm.get("peak_rss_gb"), ".1f")])
    setup = _get(data, "setup", default={})
    intro = (f"{setup.get('model', MISSING)}; {setup.get('prompts_per_step', MISSING)} prompts x "
             f"{setup.get('width', MISSING)} completions, at most {setup.get('max_new_tokens', MISSING)} new tokens, "
             f"{setup.get('steps', MISSING)} steps per arm.\n\n")
    return intro + _table(header, body) + _source({"command": "python benchmarks/trl_adapter.py"}, "trl_adapter")


# NAME -> (the JSON file under benchmarks/results, the renderer)
TABLES: dict[str, tuple[str, Callable[[Any], str]]] = {
    "rollout_speed": ("rollout_speed.json", rollout_speed),
    "rollout_speed_eos_on": ("rollout_speed.json", rollout_speed_eos_on),
    "treepo_vs_grpo": ("treepo_vs_grpo.json", treepo_vs_grpo),
    "seed_table": ("seed_table.json", seed_table),
    "server_rollout": ("server_rollout.json", server_rollout),
    "packed_training": ("packed_training.json", packed_training),
    "sampler_bias": ("sampler_bias.json", sampler_bias),
    "trl_adapter": ("trl_adapter.json", trl_adapter),
}
TABLE_MARK = re.compile(r"<!--\s*table:\s*([a-z_0-9]+)\s*-->")


def render_table(name: str, page: str, results: Path = RESULTS) -> str:
    if name not in TABLES:
        raise DocsError(f"{page}: no table named {name!r}; known: {', '.join(TABLES)}.")
    filename, render = TABLES[name]
    path = results / filename
    if not path.is_file():
        raise DocsError(f"{page}: table {name!r} needs benchmarks/results/{filename}, which is missing "
                        f"(run the benchmark that writes it, or drop the table from the page).")
    try:
        return render(json.loads(path.read_text(encoding="utf-8")))
    except KeyError as e:
        raise DocsError(f"{page}: table {name!r}: benchmarks/results/{filename} has no {e.args[0]!r}.") from None


def render_page(markdown: str, page: str, results: Path = RESULTS) -> str:
    """A page's generated parts filled in; DocsError names the page and what is missing."""
    bad = unknown_flags(markdown)
    if bad:
        raise DocsError(f"{page}: names {', '.join(bad)}, which no treepo command has "
                        "(see the CLI reference; another tool's flag goes in docs/hooks.py OTHER_FLAGS).")
    markdown = TABLE_MARK.sub(lambda m: render_table(m.group(1), page, results), markdown)
    return markdown.replace("<!-- cli-reference -->", cli_reference())


# -- MkDocs entry point ------------------------------------------------------------------------------


def on_page_markdown(markdown: str, page, config, files) -> str:
    from mkdocs.exceptions import PluginError

    try:
        return render_page(markdown, f"docs/{page.file.src_path}")
    except DocsError as e:
        raise PluginError(str(e)) from None
