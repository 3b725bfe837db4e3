"""The `treepo` command.

    treepo rollout [--model smollm2] [--task gsm_symbolic | --prompts FILE.jsonl] [--width 8] ... --out DIR
    treepo rollout --env calculator --segment_mode turn --max_turn_tokens 128 ...   # multi-turn, with a tool
    treepo show DIR
    treepo train [--config FILE.yaml] [--steps 20] [--resume [auto]] ... [--out runs/train]
    treepo eval [--model runs/train/model] [--mode tree|independent] [--width 8] ... [--out runs/eval]

Options come from the config dataclasses (`treepo.config`), so the command line and the Python
API take the same names and the same checks; `treepo rollout --help` lists them with their help.
Bad input ends with one line naming the field and the fix, and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from rich.console import Console
from rich.logging import RichHandler

from .config import (
    EngineConfig,
    EvalConfig,
    RewardConfig,
    JobSamplerConfig,
    RolloutConfig,
    TrainConfig,
    TrainSamplerConfig,
    WeightSyncConfig,
)
from .errors import ConfigError, TreepoError
from .io import utf8_problem

USAGE = """usage: treepo <command> [options]

commands:
  rollout   grow tree (or independent) rollouts for a batch of prompts and write them to --out
  show      render the rollout trees of a run folder as trees.html and trees.png
  train     TreePO training: tree rollouts, rewards, tree advantages, PPO updates (--config FILE.yaml)
  eval      mean@k / pass@k / maj@k on held-out problems with tree or independent sampling

`treepo <command> --help` lists a command's options."""


def parse_configs(types: tuple, argv: Sequence[str], prog: str) -> tuple:
    """The config dataclasses from `--config FILE.yaml` overridden by command-line flags.

    The YAML file holds flat keys, or sections: `engine`, `sampler`, `reward` and the running
    command's own (`train`, `eval` or `rollout`; the other commands' sections are skipped, so
    one file can serve them all). Its values go through the same parsing as flags, so a wrong
    type fails the same way; an unknown key or flag suggests the closest known name.
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser(types, prog=prog)

    def one_line_error(message: str):  # argparse would print the whole usage and exit
        raise ConfigError(f"{message}; `{prog} --help` lists every option.")

    parser.error = one_line_error
    # --config is read before parsing; it is declared so that --help shows it.
    parser.add_argument("--config", default=None, help="YAML file of settings; command-line flags override it.")
    fields = {f.name: f for t in types for f in dataclasses.fields(t)}
    argv = list(argv)
    config_path = _pop_config(argv)
    if config_path:
        argv = _yaml_argv(config_path, fields, prog.split()[-1], parser) + argv  # later flags win
    *configs, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if remaining:
        flag = next((a for a in remaining if a.startswith("-")), remaining[0])
        raise ConfigError(f"unknown option {flag!r}{_suggest(flag.lstrip('-').split('=')[0], set(fields), '--')}; "
                          f"`{prog} --help` lists them.")
    return tuple(c for c in configs if dataclasses.is_dataclass(c))  # drop the namespace holding --config


def _pop_config(argv: list[str]) -> Optional[str]:
    """Remove `--config FILE` (or `--config=FILE`) from argv and return FILE."""
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file name, e.g. --config run.yaml.")
            path = argv[i + 1]
            del argv[i : i + 2]
            return path
        if arg.startswith("--config="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


SHARED_SECTIONS = ("engine", "sampler", "reward")
COMMAND_SECTIONS = ("train", "eval", "rollout")


def _yaml_argv(path: str, fields: dict, command: str, parser) -> list[str]:
    """The YAML file's settings as command-line flags (so they are parsed and checked like flags)."""
    import yaml

    try:
        if problem := utf8_problem(path):
            raise ConfigError(f"config={path!r}: {problem}")
        with open(path, encoding="utf-8-sig") as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"config={path!r}: cannot read it ({e.strerror}).") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config={path!r}: not valid YAML ({e}).") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config={path!r}: expected a mapping of settings, e.g. 'steps: 20'.")
    flat: dict = {}
    for key, value in data.items():
        if key in SHARED_SECTIONS + COMMAND_SECTIONS and isinstance(value, dict):
            if key in SHARED_SECTIONS or key == command:
                flat.update(value)
        else:
            flat[key] = value
    argv: list[str] = []
    for key, value in flat.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise ConfigError(f"config={path!r}: unknown key {key!r}{_suggest(name, set(fields), '')}.")
        if value is None:
            if "Optional" not in str(fields[name].type):
                raise ConfigError(f"config={path!r}: {name} is empty; give it a value or drop the key.")
            parser.set_defaults(**{name: None})
            continue
        if isinstance(value, list) and str(fields[name].type).startswith("list["):
            argv += [f"--{name}", *(str(v) for v in value)]  # a list field (server_url, stop_strings): several values
            continue
        if isinstance(value, (dict, list)):
            if name not in ("task_args", "env_args"):
                raise ConfigError(f"config={path!r}: {name} takes one value, not {type(value).__name__} {value!r}.")
            value = json.dumps(value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        _check_yaml_value(path, key, str(value), parser)
        argv += [f"--{name}", str(value)]
    return argv


def _check_yaml_value(path: str, key: str, value: str, parser) -> None:
    """A YAML value of the wrong type is named by its file and key (argparse would blame the flag)."""
    action = next((a for a in parser._actions if f"--{str(key).replace('-', '_')}" in a.option_strings), None)
    if action is None or action.type is None:
        return
    try:
        parsed = action.type(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        kind = {int: "an integer", float: "a number"}.get(action.type, "true or false" if action.nargs == "?" else "")
        raise ConfigError(f"config={path!r}: {key}: {value!r} is not {kind or 'a valid value'}"
                          + (f" (e.g. {key}: 2)." if action.type is int else ".")) from None
    if action.choices and parsed not in action.choices:
        raise ConfigError(f"config={path!r}: {key}: {value!r} is not one of "
                          f"{', '.join(str(c) for c in action.choices)}.")


def _suggest(name: str, known: set[str], prefix: str) -> str:
    close = difflib.get_close_matches(name.replace("-", "_"), sorted(known), n=2)
    return f" (did you mean {' or '.join(prefix + c for c in close)}?)" if close else ""


# The config dataclasses behind each command's flags (the docs' CLI reference is generated from these).
COMMAND_CONFIGS = {
    "rollout": (EngineConfig, JobSamplerConfig, RolloutConfig),
    "train": (EngineConfig, TrainSamplerConfig, RewardConfig, TrainConfig, WeightSyncConfig),
    "eval": (EngineConfig, JobSamplerConfig, RewardConfig, EvalConfig),
}


def _rollout(argv: Sequence[str], console: Console) -> int:
    from .rollout.job import run_rollout

    engine_cfg, sampler_cfg, rollout_cfg = parse_configs(COMMAND_CONFIGS["rollout"], argv, "treepo rollout")
    run_rollout(engine_cfg, sampler_cfg, rollout_cfg, console=console)
    return 0


def _train(argv: Sequence[str], console: Console) -> int:
    from .train.trainer import run_train

    *configs, sync_cfg = parse_configs(COMMAND_CONFIGS["train"], argv, "treepo train")
    run_train(*configs, sync_cfg=sync_cfg, console=console)
    return 0


def _eval(argv: Sequence[str], console: Console) -> int:
    from .eval.job import run_eval

    configs = parse_configs(COMMAND_CONFIGS["eval"], argv, "treepo eval")
    run_eval(*configs, console=console)
    return 0


def _show(argv: Sequence[str], console: Console) -> int:
    import argparse

    from . import io
    from .viz.render import load_trees, write_pictures
    from .viz.terminal import terminal_tree

    parser = argparse.ArgumentParser(prog="treepo show", description="Render a run folder's trees as HTML and PNG.")
    parser.add_argument("run_dir", help="a folder written by `treepo rollout --out` (it holds trees.jsonl)")
    parser.add_argument("--out", default=None, help="where to write trees.html and trees.png (default: run_dir)")
    parser.add_argument("--max-png-trees", type=int, default=4, help="trees drawn in the PNG (the HTML has all)")
    parser.add_argument("--terminal-trees", type=int, default=1,
                        help="trees also drawn in the terminal (environment turns tagged 'env'); 0 = none")
    args = parser.parse_args(list(argv))
    run_dir = Path(args.run_dir)
    trees = load_trees(run_dir)
    summary_path = run_dir / "summary.json"
    summary = io.read_json(summary_path) if summary_path.is_file() else None
    html, png = write_pictures(trees, Path(args.out or run_dir), title=f"treepo rollout: {run_dir}",
                               summary=summary, max_png_trees=args.max_png_trees)
    for tree in trees[: max(args.terminal_trees, 0)]:
        console.print(terminal_tree(tree))
    console.print(f"wrote {html} and {png}")
    return 0


COMMANDS = {"rollout": _rollout, "show": _show, "train": _train, "eval": _eval}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    console = Console(stderr=True, soft_wrap=True)  # an error line stays one line in logs
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)])
    for noisy in ("httpx", "urllib3", "filelock", "matplotlib"):  # e.g. matplotlib's "generated new fontManager"
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar is the one that matters
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        console.print(f"[red]error:[/red] unknown command {argv[0]!r}\n{USAGE}")
        return 2
    try:
        return command(argv[1:], console)
    except TreepoError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: rollout and eval files are written only when a run completes; "
                      "training resumes from its last checkpoint with --resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
