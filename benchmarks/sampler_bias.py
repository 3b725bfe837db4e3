"""Sampler bias and true savings, measured on a model-free engine whose answer-length law is known.

    .venv/bin/python benchmarks/sampler_bias.py            # about a minute on 2 CPU cores

`HazardEngine(1/48)` ends each token with EOS with probability 1/48 (answers of 48 tokens on average,
cut at a 128-token budget), and an answer is "correct" when it has at most 40 tokens, so correctness
falls with length as in real training (wrong answers run longer). The truth is known: the policy's
accuracy is 1 - (47/48)^40 = 0.569. For each sampler setting, on the same 400 prompts (w=8), it
measures against an independent run of the same engine:

- leaf bias: mean leaf tokens of the tree vs the policy's (independent) mean answer, and the share of
  answers ending in the first segment;
- accuracy on the tree's leaves (raw mean) and leaf-weighted (`tree.leaf_weights`), with 95% intervals
  over prompts, against the independent estimate and the truth;
- the measured decoded-token saving against independent sampling and the structural one
  (`saving_vs_own_leaves`);
- dynamic sampling: share of groups whose rewards are all equal (dropped);
- for each advantage estimator and whitening: the share of wrong trajectories whose token-mean
  advantage is positive (a sign flip pushes a wrong answer up).

Writes benchmarks/results/sampler_bias.json and .png. Nothing here touches a held-out split: it is
the sampler's own statistics, used to choose the sampler defaults of `treepo train`.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from treepo import io
from treepo.config import SamplerConfig
from treepo.engines.simulated import HazardEngine
from treepo.rollout.accounting import summarize
from treepo.rollout.sampler import TreeSampler
from treepo.train.update import build_samples
from treepo.tree import leaf_weights

HAZARD, BUDGET, CORRECT_MAX = 1 / 48, 128, 40
TRUTH = 1 - (1 - HAZARD) ** CORRECT_MAX

SETTINGS = {  # name -> sampler overrides (width 8, response budget 128 tokens)
    "transfer, fan-out 2, seg 32": dict(budget="transfer", segment_len=32),
    "branch, fan-out 2, seg 32": dict(budget="branch", segment_len=32),
    "transfer, fan-out 2..8, seg 32": dict(budget="transfer", segment_len=32, init_divergence=2, init_divergence_max=8),
    "branch, fan-out 2..8, seg 32": dict(budget="branch", segment_len=32, init_divergence=2, init_divergence_max=8),
    "transfer, fan-out 2, seg 16": dict(budget="transfer", segment_len=16),
    "branch, fan-out 2, seg 16": dict(budget="branch", segment_len=16),
    "branch, fan-out 2..8, seg 16": dict(budget="branch", segment_len=16, init_divergence=2, init_divergence_max=8),
    "transfer, fan-out 2, seg 8": dict(budget="transfer", segment_len=8),
    "branch, fan-out 2, seg 8": dict(budget="branch", segment_len=8),
    "transfer, fan-out 1, seg 16": dict(budget="transfer", segment_len=16, init_divergence=1),
    "transfer, fan-out 1, seg 8": dict(budget="transfer", segment_len=8, init_divergence=1),
    "transfer, fan-out 1, seg 4": dict(budget="transfer", segment_len=4, init_divergence=1),
    "transfer, fan-out 2, seg 8, b=4": dict(budget="transfer", segment_len=8, branching=4),
}
ESTIMATORS = ("grpo", "average", "unbiased")
WHITENINGS = ("token", "scale", "group", "none")


def rollout(cfg: SamplerConfig, prompts: int, seed: int):
    result = TreeSampler(cfg, HazardEngine(HAZARD, seed=seed)).rollout([[0]] * prompts)
    for tree in result.trees:
        for leaf in tree.leaves:
            tree.rewards[leaf] = 1.0 if len(tree.response_ids(leaf)) <= CORRECT_MAX else -1.0
    return result


def ci(per_prompt: list[float]) -> list[float]:
    a = np.asarray(per_prompt)
    half = 1.96 * a.std(ddof=1) / math.sqrt(len(a))
    return [round(float(a.mean() - half), 4), round(float(a.mean() + half), 4)]


def measure(cfg: SamplerConfig, prompts: int, seed: int) -> dict:
    result = rollout(cfg, prompts, seed)
    trees = result.trees
    raw, weighted, first_seg = [], [], []
    for t in trees:
        correct = [t.rewards[x] > 0 for x in t.leaves]
        raw.append(float(np.mean(correct)))
        weighted.append(float(np.dot(leaf_weights(t.leaves), correct)))
        first_seg += [len(x) == 1 for x in t.leaves]
    summary = summarize([result], cfg)
    flips = {}
    # build_samples keeps tree order and leaf order, and skips empty responses
    sample_rewards = [t.rewards[x] for t in trees for x in t.leaves if t.response_ids(x)]
    for est in ESTIMATORS:
        if cfg.mode == "tree" or est != "average":
            for wh in WHITENINGS:
                samples = build_samples(trees, est, wh)
                wrong = [np.mean(s.advantages) > 1e-9 for s, r in zip(samples, sample_rewards, strict=True) if r < 0]
                flips[f"{est}+{wh}"] = round(float(np.mean(wrong)), 4) if wrong else 0.0
    return {
        "accuracy_raw": round(float(np.mean(raw)), 4), "accuracy_raw_ci": ci(raw),
        "accuracy_weighted": round(float(np.mean(weighted)), 4), "accuracy_weighted_ci": ci(weighted),
        "mean_leaf_tokens": summary["mean_response_tokens"],
        "weighted_response_tokens": summary["weighted_response_tokens"],
        "first_segment_share": round(float(np.mean(first_seg)), 4),
        "decoded_tokens": summary["decoded_tokens"], "leaf_tokens": summary["leaf_tokens"],
        "saving_vs_own_leaves": summary["saving_vs_own_leaves"],
        "dropped_groups": round(float(np.mean([len({t.rewards[x] for x in t.leaves}) == 1 for t in trees])), 4),
        "fallbacks_per_tree": round(summary["fallbacks"] / len(trees), 3),
        "wrong_with_positive_advantage": flips,
    }


def plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    from treepo.viz.plots import save_png

    names = list(result["settings"])
    rows = [result["settings"][n] for n in names]
    fig = Figure(figsize=(11, 5.5))
    ax1, ax2 = fig.subplots(1, 2)
    y = np.arange(len(names))
    for k, (key, label) in enumerate((("accuracy_raw", "raw leaf mean"), ("accuracy_weighted", "leaf-weighted"))):
        vals = [r[key] for r in rows]
        err = np.array([[v - r[key + "_ci"][0], r[key + "_ci"][1] - v] for v, r in zip(vals, rows)]).T
        ax1.errorbar(vals, y + (k - 0.5) * 0.25, xerr=err, fmt="o", label=label)
    ind = result["independent"]["accuracy_raw"]
    ax1.axvline(ind, color="k", ls="--", lw=1, label=f"independent ({ind:.3f})")
    ax1.axvline(TRUTH, color="g", ls=":", lw=1, label=f"truth ({TRUTH:.3f})")
    ax1.set_yticks(y, names, fontsize=8)
    ax1.set_xlabel("accuracy (answers <= 40 tokens)")
    ax1.legend(fontsize=8)
    ax1.set_title("Tree leaves vs the policy")
    ax2.barh(y - 0.2, [100 * r["measured_saving"] for r in rows], 0.4, label="vs independent (measured)")
    ax2.barh(y + 0.2, [100 * r["saving_vs_own_leaves"] for r in rows], 0.4, label="vs own leaves (structural)")
    ax2.set_yticks(y, [""] * len(names))
    ax2.set_xlabel("decoded-token saving (%)")
    ax2.axvline(0, color="k", lw=0.8)
    ax2.legend(fontsize=8)
    ax2.set_title("Saving")
    fig.tight_layout()
    save_png(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    base = SamplerConfig(width=8, depth=4, segment_len=32, branching=2, seed=args.seed, answer_policy="none",
                         rep_count=0, max_response_tokens=BUDGET)
    independent = measure(replace(base, mode="independent"), args.prompts, args.seed)
    settings = {}
    for name, overrides in SETTINGS.items():
        cfg = replace(base, depth=BUDGET // overrides["segment_len"], **overrides)
        row = measure(cfg, args.prompts, args.seed)
        row["measured_saving"] = round(1 - row["decoded_tokens"] / independent["decoded_tokens"], 4)
        settings[name] = row
        print(f"{name:32s} raw {row['accuracy_raw']:.3f} weighted {row['accuracy_weighted']:.3f} "
              f"leaf {row['mean_leaf_tokens']:.1f} saving {row['measured_saving']:+.3f} "
              f"(own leaves {row['saving_vs_own_leaves']:.3f}) dropped {row['dropped_groups']:.3f}", file=sys.stderr)
    result = {
        "command": "python benchmarks/sampler_bias.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "hazard": HAZARD, "budget_tokens": BUDGET, "correct_max_tokens": CORRECT_MAX, "truth_accuracy": round(TRUTH, 4),
        "prompts": args.prompts, "width": 8, "branching": 2,
        "independent": independent, "settings": settings,
    }
    out = Path(args.out)
    io.write_json(out / "sampler_bias.json", result)
    plot(result, out / "sampler_bias.png")
    print(f"wrote {out}/sampler_bias.json and .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
