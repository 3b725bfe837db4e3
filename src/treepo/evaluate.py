"""Evaluation (spec section 7): k samples per problem, tree or independent, mean@k / pass@k / maj@k.

    treepo eval --model runs/train/model --mode tree --width 8 --num-prompts 64 --out runs/eval

`score_trees` (rewards for every leaf of a batch of trees) is shared with the trainer, and
`evaluate` is what the trainer calls for its held-out accuracy before, during and after training.
Outputs: `eval.json` (metrics with bootstrap intervals, tokens and wall time per solved problem,
the configs) and `samples.jsonl` (every completion with its answer and reward), written together.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict
from typing import Callable, Optional, Sequence

from rich.console import Console
from rich.table import Table

from . import io
from .accounting import summarize
from .config import EngineConfig, EvalConfig, RewardConfig, SamplerConfig
from .engines.base import Engine
from .envs import load_env, system_prompt_with
from .errors import InputError
from .metrics import summarize_eval
from .prompts import Prompt, load_heldout, load_jsonl, load_task, parse_task_args, render
from .rewards import RewardFunction, build_reward
from .sampler import TreeSampler
from .stopping import answer_predicate
from .tree import PromptTree


def score_trees(
    trees: Sequence[PromptTree], prompts: Sequence[Prompt], reward_fn: RewardFunction, engine: Engine
) -> tuple[list[dict], Counter]:
    """Score every leaf of every tree in one reward call; fills `tree.rewards`.

    `prompts[tree.prompt_index]` is each tree's problem. Returns, in the order of `trees`, each one's leaves'
    {"correct", "answers", "texts"} lists, and the failure counts of the call. A completion is the
    model's own text: with environment turns, its assistant turns joined by newlines (a tool's
    output is not the model's answer).
    """
    flat = [(t, leaf) for t in trees for leaf in t.leaves]
    texts = ["\n".join(engine.decode(ids) for ids in t.model_turn_ids(leaf)) for t, leaf in flat]
    questions = [prompts[t.prompt_index].question for t, _ in flat]
    columns = {
        "answer": [prompts[t.prompt_index].answer for t, _ in flat],
        "entry": [prompts[t.prompt_index].metadata for t, _ in flat],
    }
    outcome = reward_fn(questions, texts, columns)
    per_tree = [{"correct": [], "answers": [], "texts": []} for _ in trees]
    position = {id(t): k for k, t in enumerate(trees)}
    for i, ((tree, leaf), text) in enumerate(zip(flat, texts)):
        tree.rewards[leaf] = outcome.rewards[i]
        row = per_tree[position[id(tree)]]
        row["correct"].append(bool(outcome.correct[i]))
        row["answers"].append(outcome.answers[i])
        row["texts"].append(text)
    return per_tree, outcome.failures


def evaluate(
    engine: Engine,
    sampler_cfg: SamplerConfig,
    prompts: Sequence[Prompt],
    reward_fn: RewardFunction,
    *,
    system_prompt: str,
    k: int = 0,
    batch_size: int = 8,
    on_batch: Optional[Callable[[int], None]] = None,
) -> tuple[dict, list[dict]]:
    """(summary, per-sample rows) for `prompts`, `sampler_cfg.width` samples each."""
    sampler = TreeSampler(sampler_cfg, engine, predicate=answer_predicate(sampler_cfg))
    system_prompt = system_prompt_with(system_prompt, sampler.env)
    ids = [render(p, engine.tokenizer, system_prompt) for p in prompts]
    for i, p in enumerate(ids):
        sampler.check_fits(p, i)
    k = check_k(k, sampler_cfg.width)
    problems, rows, results, failures = [], [], [], Counter()
    for start in range(0, len(ids), batch_size):
        t0 = time.perf_counter()
        result = sampler.rollout(ids[start : start + batch_size], first_index=start)
        scored, fails = score_trees(result.trees, prompts, reward_fn, engine)
        seconds = time.perf_counter() - t0
        failures.update(fails)
        results.append(result)
        for j, tree in enumerate(result.trees):
            s = scored[j]
            problems.append({"correct": s["correct"], "answers": s["answers"], "decoded_tokens": tree.decoded_tokens,
                             "wall_seconds": seconds / len(result.trees)})
            p = prompts[tree.prompt_index]
            for leaf, text, ok, ans in zip(tree.leaves, s["texts"], s["correct"], s["answers"]):
                rows.append({"prompt_index": tree.prompt_index, "question": p.question, "reference": p.answer,
                             "node_path": list(leaf), "completion": text, "answer": ans, "correct": ok,
                             "reward": tree.rewards[leaf], "finish_reason": tree.nodes[leaf].finish_reason})
        if on_batch:
            on_batch(len(result.trees))
    summary = summarize_eval(problems, k)
    rollout = summarize(results, sampler_cfg)
    summary.update({
        "mode": sampler_cfg.mode,
        "width": sampler_cfg.width,
        "leaf_tokens": rollout["leaf_tokens"],
        "saving_ratio": rollout["saving_ratio"],
        "reward_failures": dict(failures),
        "wall_seconds": sum(p["wall_seconds"] for p in problems),
    })
    return summary, rows


def check_k(k: int, width: int) -> int:
    """k for mean@k / pass@k / maj@k (0 = width); it cannot exceed the samples per problem."""
    if k > width:
        raise InputError(f"k={k} exceeds width={width}: mean@k needs k samples per problem; raise --width or lower --k.")
    return k or width


def eval_prompts(cfg: EvalConfig, seed: int) -> list[Prompt]:
    """The problems `treepo eval` scores: a JSONL file as given, or a reasoning-gym split."""
    if cfg.prompts:
        return load_jsonl(cfg.prompts, cfg.num_prompts)
    args = parse_task_args(cfg.task_args)
    if cfg.split == "train":
        return load_task(cfg.task, cfg.num_prompts, seed, args)
    pool = {p.question for p in load_task(cfg.task, cfg.train_pool, seed, args)}
    return load_heldout(cfg.task, cfg.num_prompts, seed, args, pool)


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
    if engine_cfg.engine == "server":
        from .engines.server import check_sampler_config

        check_sampler_config(sampler_cfg)
    if engine is None:
        from .models import load_engine

        with console.status(f"loading model {engine_cfg.model} ..."):
            engine = load_engine(engine_cfg, seed=sampler_cfg.seed)
    from .rollout import progress_bar

    with progress_bar(console) as progress:
        task = progress.add_task("eval", total=len(prompts), info="")
        summary, rows = evaluate(engine, sampler_cfg, prompts, reward_fn, system_prompt=eval_cfg.system_prompt,
                                 k=eval_cfg.k, batch_size=eval_cfg.prompt_batch_size,
                                 on_batch=lambda n: progress.advance(task, n))
    summary["model"] = engine_cfg.model
    if hasattr(engine, "server_report"):
        summary["servers"] = engine.server_report()
    summary["config"] = {"engine": asdict(engine_cfg), "sampler": asdict(sampler_cfg),
                         "reward": asdict(reward_cfg), "eval": asdict(eval_cfg)}
    with io.staged_dir(out) as stage:
        io.write_json(stage / "eval.json", summary)
        io.write_jsonl(stage / "samples.jsonl", rows)
    console.print(eval_table(summary))
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
    table.add_row("saving ratio (vs independent)", f"{summary['saving_ratio']:.1%}")
    return table

