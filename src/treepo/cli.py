"""The `treepo` command.

    treepo rollout [--model smollm2] [--task gsm_symbolic | --prompts FILE.jsonl] [--width 8] ... --out DIR
    treepo show DIR

Options come from the config dataclasses (`treepo.config`), so the command line and the Python
API take the same names and the same checks; `treepo rollout --help` lists them with their help.
Bad input ends with one line naming the field and the fix, and exit status 2.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from rich.console import Console
from rich.logging import RichHandler

from .config import EngineConfig, RolloutConfig, SamplerConfig
from .errors import TreepoError

USAGE = """usage: treepo <command> [options]

commands:
  rollout   grow tree (or independent) rollouts for a batch of prompts and write them to --out
  show      render the rollout trees of a run folder as trees.html and trees.png

`treepo <command> --help` lists a command's options."""


def _rollout(argv: Sequence[str], console: Console) -> int:
    from transformers import HfArgumentParser

    from .rollout import run_rollout

    parser = HfArgumentParser((EngineConfig, SamplerConfig, RolloutConfig), prog="treepo rollout")
    engine_cfg, sampler_cfg, rollout_cfg = parser.parse_args_into_dataclasses(args=list(argv))
    run_rollout(engine_cfg, sampler_cfg, rollout_cfg, console=console)
    return 0


def _show(argv: Sequence[str], console: Console) -> int:
    import argparse

    from . import io
    from .render import load_trees, write_pictures

    parser = argparse.ArgumentParser(prog="treepo show", description="Render a run folder's trees as HTML and PNG.")
    parser.add_argument("run_dir", help="a folder written by `treepo rollout --out` (it holds trees.jsonl)")
    parser.add_argument("--out", default=None, help="where to write trees.html and trees.png (default: run_dir)")
    parser.add_argument("--max-png-trees", type=int, default=4, help="trees drawn in the PNG (the HTML has all)")
    args = parser.parse_args(list(argv))
    run_dir = Path(args.run_dir)
    trees = load_trees(run_dir)
    summary_path = run_dir / "summary.json"
    summary = io.read_json(summary_path) if summary_path.is_file() else None
    html, png = write_pictures(trees, Path(args.out or run_dir), title=f"treepo rollout: {run_dir}",
                               summary=summary, max_png_trees=args.max_png_trees)
    console.print(f"wrote {html} and {png}")
    return 0


COMMANDS = {"rollout": _rollout, "show": _show}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    console = Console(stderr=True, soft_wrap=True)  # an error line stays one line in logs
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)])
    for noisy in ("httpx", "urllib3", "filelock"):
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
        console.print("[yellow]interrupted[/yellow]: output files are written only when a run completes")
        return 130


if __name__ == "__main__":
    sys.exit(main())
