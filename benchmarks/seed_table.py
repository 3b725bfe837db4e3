"""The ms-swift TreePO table, reproduced in its own layout on this machine.

    .venv/bin/python benchmarks/seed_table.py                  # about 15 minutes on 2 CPU cores; resumable

ms-swift's TreePO example reports, for a batch of 8 prompts x 8 generations and max tree depth 4, 5 and
6, an "original" row (independent sampling) and tree rows with max divergence 2 and 3: total engine
calls, the saving in calls against the original, training iterations per second and its improvement
(Qwen2.5-0.5B, NuminaMath-TIR, two GPUs: 25-53% fewer calls, +9-29% iter/s). Here the same layout on
SmolLM2-135M (CPU, EOS on, `--steps` training steps each):

- original: `--mode independent`, depth d, segments of 240 / d tokens (the same 240-token budget in every
  row, so the depths differ only in where a tree may fork);
- tree, divergence c: the particle budget on a fixed shape, root fan-out c, each path forking into c at
  every segment boundary while it holds more than one particle;
- engine calls counted both ways: `requests` (one per segment generated, ms-swift's count) and `rounds`
  (batched engine calls); decoded tokens beside them, and the distinct leaves per group, since a
  particle tree may repeat a leaf;
- saving against the original row of the same depth, for calls and for tokens (named apart);
  iterations per second = steps / training seconds (rollouts + updates), and its change.
Task: chain_sum (2 terms) with the step-by-step prompt; no dynamic sampling, so every step does the same
work. Every finished row is stored at once in benchmarks/results/seed_table.json and skipped on a rerun.
Writes seed_table.json (rows for the docs' table) and seed_table.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console

from treepo import io
from treepo.config import DEFAULT_SYSTEM_PROMPT, EngineConfig, RewardConfig, SamplerConfig, TrainConfig
from treepo.engines.loading import load_model
from treepo.train.trainer import Trainer

TASK, TASK_ARGS = "chain_sum", '{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}'
BUDGET = 240  # response tokens in every row: segments of 240 / depth
DEPTHS = (4, 5, 6)
VARIANTS = (("original", 0), ("tree", 2), ("tree", 3))  # (kind, max divergence)


def sampler_for(kind: str, divergence: int, depth: int, width: int, seed: int) -> SamplerConfig:
    common = dict(width=width, depth=depth, segment_len=BUDGET // depth, seed=seed)
    if kind == "original":
        return SamplerConfig(mode="independent", **common)
    return SamplerConfig(budget="particles", shape="fixed", branching=divergence, init_divergence=divergence,
                         fork_depth=1, **common)


def run_row(model, tokenizer, initial, kind: str, divergence: int, depth: int, args, console) -> dict:
    model.load_state_dict(initial)
    scratch = Path(tempfile.mkdtemp(prefix="treepo-seed-table-"))
    try:
        train_cfg = TrainConfig(task=TASK, task_args=TASK_ARGS, system_prompt=DEFAULT_SYSTEM_PROMPT, steps=args.steps,
                                prompts_per_step=args.prompts, learning_rate=2e-5, dynamic_sampling=False,
                                eval_prompts=0, checkpoint_every=0, tensorboard=False, out=str(scratch))
        trainer = Trainer(EngineConfig(), sampler_for(kind, divergence, depth, args.width, args.seed), RewardConfig(),
                          train_cfg, model=model, tokenizer=tokenizer, console=console)
        summary = trainer.train()
        rows = [r for r in trainer.rows if "reward_mean" in r]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = sum(r["step_seconds"] for r in rows)
    return {
        "max tree depth": depth, "variant": "original" if kind == "original" else f"tree, max divergence {divergence}",
        "requests": sum(r["segments"] for r in rows), "rounds": sum(r["engine_rounds"] for r in rows),
        "decoded tokens": summary["decoded_tokens"],
        "distinct leaves / group": round(sum(r["distinct_leaves_per_group"] for r in rows) / len(rows), 2),
        "iter/s": round(len(rows) / seconds, 5), "seconds": round(seconds, 1),
    }


def with_savings(rows: list[dict]) -> list[dict]:
    """Each row with its saving against the original row of its depth (calls and tokens) and its iter/s change."""
    out = []
    for r in rows:
        base = next((b for b in rows if b["max tree depth"] == r["max tree depth"] and b["variant"] == "original"), None)
        r = dict(r)
        if base is not None:
            r["requests saved"] = round(1 - r["requests"] / base["requests"], 4)
            r["tokens saved"] = round(1 - r["decoded tokens"] / base["decoded tokens"], 4)
            r["iter/s change"] = round(r["iter/s"] / base["iter/s"] - 1, 4)
        out.append(r)
    return out


def markdown(rows: list[dict]) -> str:
    header = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.1%}" if k.endswith(("saved", "change")) and k in r
                                        else str(r.get(k, "—")) for k in header) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2, help="training steps per row")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step (the batch)")
    ap.add_argument("--width", type=int, default=8, help="generations per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)
    path = Path(args.out) / "seed_table.json"
    old = io.read_json(path) if path.is_file() else {}
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    done = {(r["max tree depth"], r["variant"]): r for r in old.get("raw_rows", [])} if old.get("settings") == settings else {}
    model, tokenizer = load_model(EngineConfig())
    initial = copy.deepcopy(model.state_dict())
    for depth in DEPTHS:
        for kind, divergence in VARIANTS:
            name = "original" if kind == "original" else f"tree, max divergence {divergence}"
            if (depth, name) in done:
                continue
            console.rule(f"depth {depth}: {name}")
            done[(depth, name)] = run_row(model, tokenizer, initial, kind, divergence, depth, args, console)
            raw = [done[k] for k in sorted(done)]
            io.write_json(path, {
                "command": "python benchmarks/seed_table.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, float32), CPU", "task": f"{TASK} {TASK_ARGS}",
                "budget_tokens": BUDGET, "settings": settings,
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
                "rows": with_savings(raw), "raw_rows": raw,
            })
    rows = with_savings([done[k] for k in sorted(done)])
    io.write_text(Path(args.out) / "seed_table.md", markdown(rows))
    console.print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
