"""The rollout job: prompts -> tree (or independent) rollouts -> files and a summary.

    treepo rollout --task gsm_symbolic --num-prompts 4 --width 8 --out runs/rollout

Every input is checked before any model work (output folder, answer predicate, prompt source,
model, prompt lengths), and the output files are written only when the rollout is complete, as
one set moved into place together:

- `rollouts.jsonl`: one line per trajectory (prompt_index, node_path, token_ids, logprobs,
  entropies, segment_ends, finish_reason, text, loss_mask, turns);
- `trees.jsonl`: one line per prompt, the whole tree (for `treepo show`);
- `summary.json`: counts, tokens, savings and the bound, timings, and the configs used.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

from .. import io
from ..config import EngineConfig, RolloutConfig, SamplerConfig
from ..engines.base import Engine
from ..engines.loading import job_engine
from ..envs import load_env, system_prompt_with
from ..progress import Throughput, progress_bar
from ..prompts import choose_prompts, render
from .accounting import summarize
from .sampler import RolloutResult, RoundInfo, TreeSampler
from .shape import batches, describe_shape
from .stopping import answer_predicate

log = logging.getLogger(__name__)


def run_rollout(
    engine_cfg: EngineConfig,
    sampler_cfg: SamplerConfig,
    rollout_cfg: RolloutConfig,
    *,
    engine: Optional[Engine] = None,
    console: Optional[Console] = None,
) -> dict:
    """Run the job and return its summary. Pass `engine` to reuse a loaded one (its tokenizer renders prompts)."""
    console = console or Console(stderr=True)
    out = io.check_output_dir(rollout_cfg.out)
    predicate = answer_predicate(sampler_cfg)  # imports a custom predicate now, before model work
    env = load_env(sampler_cfg.env, sampler_cfg.env_args)  # and the environment
    prompts = choose_prompts(rollout_cfg, sampler_cfg.seed)
    with job_engine(engine_cfg, sampler_cfg, console, engine) as engine:
        sampler = TreeSampler(sampler_cfg, engine, predicate=predicate, env=env)
        system_prompt = system_prompt_with(rollout_cfg.system_prompt, env)
        ids = [render(p, engine.tokenizer, system_prompt) for p in prompts]
        for i, p in enumerate(ids):
            sampler.check_fits(p, i)
        size = rollout_cfg.prompt_batch_size
        plan = sampler.plan([len(p) for p in ids], size)  # refuses a KV cache that cannot fit, before any work
        console.print(f"rollout plan: {plan.describe()}", highlight=False)

        results: list[RolloutResult] = []
        with progress_bar(console) as progress:
            task = progress.add_task("rollout", total=len(ids), info="starting")
            done_before, rounds = 0, [0]
            speed = Throughput(plan.most_tokens)

            def info(text: str) -> str:
                rate = speed.describe()
                return f"{text}; {rate}" if rate else text

            def on_round(round_info: RoundInfo) -> None:
                rounds[0] = round_info.round
                speed.add(round_info.new_tokens)
                progress.update(task, completed=done_before + round_info.trees_done,
                                info=info(f"round {round_info.round} done, {round_info.requests} paths"))

            def on_progress(text: str) -> None:  # within a round: a wide round can take minutes
                progress.update(task, info=info(f"round {rounds[0] + 1}: {text}"))

            sampler.on_round = on_round
            engine.on_progress = on_progress
            try:
                for start, end in batches(len(ids), size, sampler.shaper):
                    rounds[0] = 0
                    results.append(sampler.rollout(ids[start:end], first_index=start))
                    done_before += len(results[-1].trees)
                    if results[-1].shape is not None:
                        log.info("prompts %d-%d: %s", start, end - 1, describe_shape(results[-1].shape))
            finally:
                engine.on_progress = None

        for result in results:
            for tree in result.trees:
                p = prompts[tree.prompt_index]
                tree.prompt_text, tree.answer = p.question, p.answer
                tree.metadata = {k: v for k, v in p.metadata.items() if k in ("task", "index")}
        summary = summarize(results, sampler_cfg)
        summary["model"] = engine_cfg.model
        server_report = getattr(engine, "server_report", None)
        if server_report is not None:  # the server engine: per-server requests, tokens, cache hits, retries
            summary["servers"] = server_report()
        summary["config"] = {"engine": asdict(engine_cfg), "sampler": asdict(sampler_cfg), "rollout": asdict(rollout_cfg)}
        write_outputs(out, results, summary, engine)
        console.print(summary_table(summary))
        if "servers" in summary:
            console.print(servers_table(summary["servers"]))
        console.print(f"wrote {rollout_cfg.out}/rollouts.jsonl, trees.jsonl, summary.json")
        return summary


def write_outputs(out: Path, results: list[RolloutResult], summary: dict, engine: Engine) -> None:
    trees = [t for r in results for t in r.trees]

    def rows():
        for tree in trees:
            for leaf in tree.leaves:
                traj = tree.trajectory(leaf, text=engine.decode(tree.response_ids(leaf)))
                yield traj.to_dict()

    with io.staged_dir(out) as stage:  # all three files appear together, or none
        io.write_jsonl(stage / "rollouts.jsonl", rows())
        io.write_jsonl(stage / "trees.jsonl", (t.to_dict() for t in trees))
        io.write_json(stage / "summary.json", summary)


def summary_table(summary: dict) -> Table:
    table = Table(title=f"treepo rollout ({summary['mode']})", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    rows = [
        ("prompts", summary["prompts"]),
        ("trajectories", summary["trajectories"]),
        ("leaf tokens (the tree's own leaves)", summary["leaf_tokens"]),
        ("decoded tokens (unique)", summary["decoded_tokens"]),
        ("saving vs own leaves (not vs independent)", f"{summary['saving_vs_own_leaves']:.1%}"),
        ("structural bound", f"{summary['bound_saving_ratio']:.1%}"),
        ("mean answer tokens: leaves / weighted", f"{summary['mean_response_tokens']} / "
                                                  f"{summary['weighted_response_tokens']}"),
        ("prefill tokens", summary["prefill_tokens"]),
        ("engine steps", summary["engine_steps"]),
        ("fallbacks", summary["fallbacks"]),
        *([("env turns (tokens, not decoded)", f"{summary['env_turns']} ({summary['env_tokens']})"),
           ("assistant turns per trajectory", summary["mean_turns"])] if summary.get("env_turns") else []),
        ("wall time", f"{summary['wall_seconds']:.1f} s"),
        ("trajectories / s", summary["trajectories_per_second"]),
        ("decoded tokens / s", summary["decoded_tokens_per_second"]),
        ("finish reasons", ", ".join(f"{k} {v}" for k, v in summary["finish_reasons"].items())),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    return table


def servers_table(report: dict) -> Table:
    """Per-server accounting of the server engine (`ServerEngine.server_report`)."""
    table = Table(title=f"servers ({report['dialect']} prompts, model {report['model']}, {report['routing']})")
    for name in ("server", "requests", "prompt tokens", "cached prompt tokens", "completion tokens", "retries",
                 "failures", "busy s"):
        table.add_column(name, justify="left" if name == "server" else "right")
    for s in report["servers"]:
        cached = "not reported" if s["cached_prompt_tokens"] is None else str(s["cached_prompt_tokens"])
        table.add_row(s["url"], str(s["requests"]), str(s["prompt_tokens"]), cached, str(s["completion_tokens"]),
                      str(s["retries"]), str(s["failures"]), f"{s['busy_seconds']:.1f}")
    return table
