"""What a training step and a run report: the metrics row of one step, the progress line, the run summary.

`step_row` turns a step's rollouts, rewards and update into the row `metrics.jsonl` gets (see the
keys below); `brief` is the progress bar's one-line digest of a row; `run_summary` is `summary.json`.
"""

from __future__ import annotations

from collections import Counter
import numpy as np

from ..config import SamplerConfig
from ..rollout.accounting import summarize


def step_row(step: int, results: list, sampler_cfg: SamplerConfig, *, rewards_all: list, correct_all: list,
             weighted: list, update: dict, lr: float, trained: int, dropped: int, rounds: int, failures: Counter,
             rollout_seconds: float, train_seconds: float, step_seconds: float) -> dict:
    """The metrics row of one step (all ranks' rollouts; `weighted` holds per tree (reward, accuracy))."""
    roll = summarize(results, sampler_cfg)
    depths = [len(t.model_path(leaf)[0]) for r in results for t in r.trees for leaf in t.leaves]  # model segments
    lengths = [t.model_tokens(leaf) for r in results for t in r.trees for leaf in t.leaves]  # answer tokens
    ents = [e for r in results for t in r.trees for n in t.nodes.values() if not n.env for e in n.entropies]
    return {
        "step": step,
        "reward_mean": float(np.mean(rewards_all)),  # over the leaves (biased toward long paths in trees)
        "accuracy": float(np.mean(correct_all)),
        "reward_weighted": float(np.mean([r for r, _ in weighted])) if weighted else None,  # unbiased for the policy
        "accuracy_weighted": float(np.mean([a for _, a in weighted])) if weighted else None,
        **update,
        "entropy": float(np.mean(ents)) if ents else None,
        "lr": lr,
        "prompts_rolled": sum(len(r.trees) for r in results),
        "groups_trained": trained,
        "groups_dropped": dropped,
        "resample_rounds": rounds,
        "trajectories_per_prompt": roll["trajectories"] / max(roll["prompts"], 1),  # distinct leaves
        "group_size": roll["group_size"],  # the trajectories a group stands for (width; particles count)
        "distinct_leaves_per_group": roll["distinct_leaves_per_group"],
        "tree_depth_mean": float(np.mean(depths)),
        "tree_depth_max": max(depths),
        "response_tokens_mean": float(np.mean(lengths)),  # the raw mean over distinct leaves
        "weighted_response_tokens": roll["weighted_response_tokens"],  # the policy's mean answer length
        "shared_tokens": roll["shared_tokens"],  # S: what shared prefixes saved
        "particle_tokens": roll["particle_tokens"],
        "independent_tokens_estimate": roll["independent_tokens_estimate"],
        "estimated_saving_vs_independent": roll["estimated_saving_vs_independent"],
        "decoded_tokens_per_distinct_leaf": roll["decoded_tokens_per_distinct_leaf"],
        "shape": next((r.shape.as_dict() for r in results if getattr(r, "shape", None) is not None), None),
        "fallbacks": roll["fallbacks"],
        "segments": roll["segments"],  # segment requests the engine served (one per model node)
        "engine_rounds": roll["engine_steps"],  # batched engine calls
        "decoded_tokens": roll["decoded_tokens"],
        "leaf_tokens": roll["leaf_tokens"],
        "saving_vs_own_leaves": roll["saving_vs_own_leaves"],
        "finish_reasons": roll["finish_reasons"],
        "env_turns": roll["env_turns"],
        "reward_failures": sum(failures.values()),
        "reward_failure_kinds": dict(failures),
        "rollout_seconds": rollout_seconds,
        "train_seconds": train_seconds,
        "step_seconds": step_seconds,
    }


def brief(row: dict) -> str:
    """The progress bar's digest of a step's row."""
    weighted = row.get("accuracy_weighted")  # the raw leaf accuracy leans toward long answers
    acc = f"acc {row['accuracy']:.0%}" + ("" if weighted is None else f" (weighted {weighted:.0%})")
    shape = row.get("shape")
    grown = ("" if not shape else " independently" if shape["independent"]
             else f" as trees ({shape['segment_len']}-token segments, fan-out {shape['root_fanout']}, "
                  f"forks from {shape['fork_depth']})")
    return (f"reward {row['reward_mean']:+.2f}, {acc}, {row['distinct_leaves_per_group']:.1f} distinct of "
            f"{row['group_size']:.0f}{grown}, ~{row['estimated_saving_vs_independent']:.0%} fewer tokens than "
            f"independent sampling, {row['step_seconds']:.0f} s/step")


def run_summary(steps: int, rows: list[dict], evals: list[dict], configs: dict) -> dict:
    """`summary.json` of a run from its metrics rows (the step rows; evaluation-only rows are skipped)."""
    train_rows = [r for r in rows if "reward_mean" in r]
    summary = {
        "steps": steps,
        "reward_first": train_rows[0]["reward_mean"] if train_rows else None,
        "reward_last": train_rows[-1]["reward_mean"] if train_rows else None,
        "accuracy_by_step": [r["accuracy"] for r in train_rows],  # raw, over distinct leaves
        "accuracy_weighted_by_step": [r.get("accuracy_weighted") for r in train_rows],  # the policy's (unbiased)
        "decoded_tokens": sum(r["decoded_tokens"] for r in train_rows),
        "leaf_tokens": sum(r["leaf_tokens"] for r in train_rows),
        "shared_tokens": sum(r.get("shared_tokens", 0) for r in train_rows),
        "independent_tokens_estimate": sum(r.get("independent_tokens_estimate", 0) for r in train_rows),
        "weighted_response_tokens_by_step": [r.get("weighted_response_tokens") for r in train_rows],
        "response_tokens_mean_by_step": [r.get("response_tokens_mean") for r in train_rows],
        "shape_by_step": [r.get("shape") for r in train_rows],
        "wall_seconds": sum(r["step_seconds"] for r in train_rows),
        "reward_failures": dict(sum((Counter(r.get("reward_failure_kinds") or {}) for r in train_rows), Counter())),
        "evals": evals,
        "config": configs,
    }
    if summary["leaf_tokens"]:
        summary["saving_vs_own_leaves"] = 1 - summary["decoded_tokens"] / summary["leaf_tokens"]
    if summary["independent_tokens_estimate"]:
        summary["estimated_saving_vs_independent"] = 1 - summary["decoded_tokens"] / summary["independent_tokens_estimate"]
    return summary

