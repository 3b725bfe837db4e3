"""The `treepo eval` job: score a model on a problem set, tree or independent sampling.

    treepo eval --model runs/train/model --mode tree --width 8 --num-prompts 64 --out runs/eval

Outputs: `eval.json` (metrics with bootstrap intervals, tokens and wall time per solved problem,
the configs) and `samples.jsonl` (every completion with its answer and reward), written together.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Optional

from rich.console import Console
from rich.table import Table

from .. import io
from ..config import EngineConfig, EvalConfig, RewardConfig, SamplerConfig
from ..engines.base import Engine
from ..engines.loading import job_engine
from ..envs import load_env
from ..progress import progress_bar
from ..prompts import Prompt, choose_prompts, load_heldout, parse_task_args
from ..rewards.scorers import build_reward
from ..rollout.accounting import compare_modes
from ..rollout.stopping import answer_predicate
from .evaluate import check_k, evaluate


def eval_prompts(cfg: EvalConfig, seed: int) -> list[Prompt]:
    """The problems `treepo eval` scores: a JSONL file as given, or a reasoning-gym split."""
    if cfg.prompts or cfg.split == "train":
        return choose_prompts(cfg, seed)
    pool = {p.question for p in choose_prompts(cfg, seed, count=cfg.train_pool)}
    return load_heldout(cfg.task, cfg.num_prompts, seed, parse_task_args(cfg.task_args), pool)


def run_eval(
    engine_cfg: EngineConfig,
    sampler_cfg: SamplerConfig,
    reward_cfg: RewardConfig,
    eval_cfg: EvalConfig,
    *,
    engine: Optional[Engine] = None,
    console: Optional[Console] = None,
) -> dict:
    """The `treepo eval` job; returns the summary written to eval.json."""
    console = console or Console(stderr=True)
    out = io.check_output_dir(eval_cfg.out)
    check_k(eval_cfg.k, sampler_cfg.width)
    reward_fn = build_reward(reward_cfg.reward, task=None if eval_cfg.prompts else eval_cfg.task,
                             timeout=reward_cfg.reward_timeout, failure_reward=reward_cfg.failure_reward)
    prompts = eval_prompts(eval_cfg, sampler_cfg.seed)
    answer_predicate(sampler_cfg)
    load_env(sampler_cfg.env, sampler_cfg.env_args)  # a bad environment fails before the model loads
    with job_engine(engine_cfg, sampler_cfg, console, engine) as engine:
        with progress_bar(console) as progress:
            task = progress.add_task("eval", total=len(prompts), info="starting")
            engine.on_progress = lambda text: progress.update(task, info=f"batch: {text}")
            try:
                summary, rows = evaluate(engine, sampler_cfg, prompts, reward_fn, system_prompt=eval_cfg.system_prompt,
                                         k=eval_cfg.k, batch_size=eval_cfg.prompt_batch_size,
                                         on_batch=lambda n: progress.advance(task, n),
                                         on_plan=lambda plan: console.print(f"eval plan: {plan.describe()}",
                                                                            highlight=False),
                                         max_failure_share=eval_cfg.max_failure_share)
                if eval_cfg.compare_modes:  # the same problems and seed, sampled the other way
                    other_cfg = replace(sampler_cfg, mode="independent" if sampler_cfg.mode == "tree" else "tree")
                    task = progress.add_task(f"eval ({other_cfg.mode})", total=len(prompts), info="starting")
                    other, _ = evaluate(engine, other_cfg, prompts, reward_fn, system_prompt=eval_cfg.system_prompt,
                                        k=eval_cfg.k, batch_size=eval_cfg.prompt_batch_size,
                                        on_batch=lambda n: progress.advance(task, n),
                                        max_failure_share=eval_cfg.max_failure_share)
                    summary["compare"] = mode_comparison(summary, other)
            finally:
                engine.on_progress = None
        summary["model"] = engine_cfg.model
        if hasattr(engine, "server_report"):
            summary["servers"] = engine.server_report()
        summary["config"] = {"engine": asdict(engine_cfg), "sampler": asdict(sampler_cfg),
                             "reward": asdict(reward_cfg), "eval": asdict(eval_cfg)}
        with io.staged_dir(out) as stage:
            io.write_json(stage / "eval.json", summary)
            io.write_jsonl(stage / "samples.jsonl", rows)
        console.print(eval_table(summary))
        if "compare" in summary:
            console.print(compare_table(summary["compare"]))
        console.print(f"wrote {eval_cfg.out}/eval.json, samples.jsonl")
        return summary


def eval_table(summary: dict) -> Table:
    k = summary["k"]
    table = Table(title=f"treepo eval ({summary['mode']}, {summary['samples_per_problem']} samples)", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    for name in (f"mean@{k}", f"pass@{k}", f"maj@{k}"):
        m = summary[name]
        table.add_row(name, f"{m['value']:.1%}  [{m['low']:.1%}, {m['high']:.1%}]")
    per_solved = summary.get("decoded_tokens_per_solved")
    secs = summary.get("wall_seconds_per_solved")
    table.add_row("problems (solved)", f"{summary['problems']} ({summary['solved']})")
    table.add_row("decoded tokens", str(summary["decoded_tokens"]))
    table.add_row("decoded tokens / solved", "-" if per_solved is None else f"{per_solved:.0f}")
    table.add_row("wall seconds / solved", "-" if secs is None else f"{secs:.1f}")
    table.add_row("saving vs own leaves", f"{summary['saving_vs_own_leaves']:.1%}")
    failures = summary.get("reward_failures") or {}
    if failures:  # those samples scored failure_reward (wrong): the metrics above count them as wrong
        kinds = ", ".join(f"{kind} {n}" for kind, n in failures.items())
        table.add_row("[yellow]reward failures (scored wrong)[/yellow]",
                      f"[yellow]{sum(failures.values())} of {summary.get('reward_samples', '?')} ({kinds})[/yellow]")
    return table


def mode_comparison(first: dict, second: dict) -> dict:
    """Tree vs independent on the same problems, from two `evaluate` summaries (either order)."""
    tree, independent = (first, second) if first["mode"] == "tree" else (second, first)
    sides = {name: {**s, "trajectories_per_second": s["problems"] * s["samples_per_problem"] / s["wall_seconds"]
                    if s["wall_seconds"] else None} for name, s in (("tree", tree), ("independent", independent))}
    out = compare_modes(sides["tree"], sides["independent"])
    k = tree["k"]
    for name, s in (("tree", tree), ("independent", independent)):
        out[name][f"mean@{k}"] = s[f"mean@{k}"]["value"]
    return out


def compare_table(compare: dict) -> Table:
    table = Table(title="tree vs independent sampling, same problems and seed")
    for name in ("", "tree", "independent"):
        table.add_column(name, justify="left" if not name else "right")
    acc = next(k for k in compare["tree"] if k.startswith("mean@"))
    for key in (acc, "decoded_tokens", "wall_seconds", "trajectories_per_second", "saving_vs_own_leaves"):
        table.add_row(key, *(f"{compare[s].get(key):.3g}" if compare[s].get(key) is not None else "-"
                             for s in ("tree", "independent")))
    saving, speedup = compare["measured_saving"], compare["speedup"]
    table.add_row("measured saving (tree vs independent)", "-" if saving is None else f"{saving:.1%}", "")
    table.add_row("speedup (independent / tree wall)", "-" if speedup is None else f"{speedup:.2f}x", "")
    table.caption = "the tree side's accuracy is the raw mean over its leaves, which lean toward long answers"
    return table
