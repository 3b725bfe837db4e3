"""Rollout speed: tree vs independent sampling, and the embedded engine vs HF `generate`.

    .venv/bin/python benchmarks/rollout_speed.py            # about 5 minutes on 2 CPU cores

In one process on SmolLM2-135M-Instruct (the default model), with the same prompts and seed:
1. tree vs independent at width 8 and 16: depth 4, segment 32, branching 2, no early stops
   (ignore EOS, no answer or repetition stop), so every path decodes its full 128 tokens and the
   decoded-token saving must equal the structural bound;
2. the embedded engine vs `model.generate` decoding 128 sampled tokens for a batch of 16 prompts
   (prefill included in both);
3. `eos_on_rows`, the realistic rows: EOS on, answers stopping where the model stops them, short
   answers (letter_counting, 1-3 words, the training prompt, budget 4 x 64) and long ones (gsm_symbolic,
   step-by-step prompt, budget 8 x 32), at w=8 and w=16, with the default sampler (particles, adaptive
   shape, its lengths from an untimed independent warm-up on other problems of the task) against
   independent sampling on the same prompts and seeds: decoded tokens, wall time, raw and weighted mean
   answer tokens, distinct leaves per group, `measured_saving` = 1 - tree / independent decoded tokens and
   `speedup` = independent / tree wall time. `eos_on` repeats the short w=8 row.
   `--only eos_on_rows` runs just these rows and keeps the others of an existing JSON.
Ratios are taken within the run (this machine is noisy); each pair runs interleaved, `--repeats`
times, and the median ratio is reported. Writes benchmarks/results/rollout_speed.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from treepo import io
from treepo.viz.plots import save_png
from treepo.rollout.accounting import summarize
from treepo.config import DEFAULT_TRAIN_SYSTEM_PROMPT, EASY_TASK, EASY_TASK_ARGS, EngineConfig, JobSamplerConfig, SamplerConfig
from treepo.engines.base import SegmentRequest
from treepo.engines.loading import load_engine
from treepo.engines.transformers_engine import TransformersEngine
from treepo.prompts import load_task, parse_task_args, render
from treepo.rollout.accounting import compare_modes
from treepo.rollout.sampler import TreeSampler

SYSTEM = "You are a helpful assistant. Reason step by step, then give the final answer in the form \\boxed{ANSWER}."


def rollout(engine, prompts, mode: str, width: int, seed: int) -> dict:
    cfg = SamplerConfig(mode=mode, width=width, depth=4, segment_len=32, branching=2, seed=seed,
                        answer_policy="none", rep_count=0)
    return summarize([TreeSampler(cfg, engine).rollout(prompts)], cfg)


def engine_throughput(engine, prompts, new_tokens: int) -> float:
    requests = [SegmentRequest(g, (0,), (tuple(p),), new_tokens) for g, p in enumerate(prompts)]
    start = time.perf_counter()
    outputs = engine.generate(requests)
    wall = time.perf_counter() - start
    for g in range(len(prompts)):
        engine.release(g)
    return sum(len(o.token_ids) for o in outputs) / wall


def generate_throughput(model, tokenizer, prompts, new_tokens: int) -> float:
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left padding, as generate wants
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=pad)
    wall = time.perf_counter() - start
    return (out.shape[1] - width) * len(prompts) / wall


# The rows of `eos_on_rows`: (task, its settings, system prompt, "short" | "long", response budget as depth x segment).
# Short answers: the training task (SmolLM2 answers letter_counting in about 50 tokens). Long answers:
# gsm_symbolic with the step-by-step prompt, where SmolLM2's answers average about 160 tokens (many cut at
# the 256-token budget), so at least 4 segments of any length the adaptive shape may choose (<= 32 there).
EOS_ROWS = (
    (EASY_TASK, EASY_TASK_ARGS, DEFAULT_TRAIN_SYSTEM_PROMPT, "short", 4, 64),
    ("gsm_symbolic", None, SYSTEM, "long", 8, 32),
)
SIDE = ("decoded_tokens", "wall_seconds", "mean_response_tokens", "weighted_response_tokens", "trajectories",
        "distinct_leaves_per_group", "shared_tokens", "estimated_saving_vs_independent")


def _total(side: list[dict]) -> dict:
    """One side of a row, summed (tokens, time) or averaged (per-trajectory figures) over its repeats."""
    out = {k: sum(r[k] for r in side) for k in ("decoded_tokens", "wall_seconds", "trajectories", "shared_tokens")}
    out["wall_seconds"] = round(out["wall_seconds"], 3)
    for k in ("mean_response_tokens", "weighted_response_tokens", "distinct_leaves_per_group",
              "estimated_saving_vs_independent"):
        out[k] = round(statistics.mean(r[k] for r in side), 4)
    out["decoded_tokens_per_distinct_leaf"] = round(out["decoded_tokens"] / out["trajectories"], 2)
    return out


def eos_on_rows(engine, args) -> list[dict]:
    """Tree (the default sampler: particles, adaptive shape) vs independent, EOS on, same prompts and seeds.

    The adaptive shape needs the task's answer lengths: one independent warm-up rollout on other problems
    of the task (seed + 1000, not timed) gives them, as a training run's earlier steps would. Each (task,
    width) then runs tree and independent `--repeats` times (seeds seed, seed + 1, ...), interleaved."""
    rows = []
    for task, task_args, system, answers, depth, segment in EOS_ROWS:
        if answers not in args.answers.split(","):
            continue
        parsed = parse_task_args(task_args) if task_args else None
        measured = [render(p, engine.tokenizer, system) for p in load_task(task, args.eos_prompts, args.seed, parsed)]
        warm = [render(p, engine.tokenizer, system) for p in load_task(task, args.eos_prompts, args.seed + 1000, parsed)]
        pilot = TreeSampler(JobSamplerConfig(width=8, depth=depth, segment_len=segment, seed=args.seed + 1000), engine)
        pilot.rollout(warm)  # no lengths seen yet: independent sampling, whose lengths the shape is chosen from
        lengths = pilot.shaper.history.state()
        for width in (8, 16):
            sides: dict[str, list[dict]] = {"tree": [], "independent": []}
            shapes = []
            for rep in range(max(args.repeats, 2)):
                cfg = JobSamplerConfig(width=width, depth=depth, segment_len=segment, seed=args.seed + rep)
                for mode in (("tree", "independent") if rep % 2 == 0 else ("independent", "tree")):
                    sampler = TreeSampler(replace(cfg, mode=mode), engine)
                    if sampler.shaper is not None:
                        sampler.shaper.history.load(lengths)
                    result = sampler.rollout(measured)
                    if result.shape is not None:
                        shapes.append(result.shape.as_dict())
                    sides[mode].append(summarize([result], sampler.cfg))
                    print(f"eos_on {task} w={width} {mode} seed {cfg.seed}: {result.wall_seconds:.1f} s, "
                          f"{sides[mode][-1]['decoded_tokens']} decoded tokens, "
                          f"{sides[mode][-1]['distinct_leaves_per_group']} distinct leaves", flush=True)
            tree, ind = _total(sides["tree"]), _total(sides["independent"])
            ratios = [i["wall_seconds"] / t["wall_seconds"] for t, i in zip(sides["tree"], sides["independent"])]
            rows.append({
                "task": task, "task_args": task_args, "answers": answers, "width": width, "prompts": len(measured),
                "seeds": len(sides["tree"]), "budget": depth * segment, "shape": shapes[-1] if shapes else None,
                "tree": tree, "independent": ind,
                "measured_saving": round(1 - tree["decoded_tokens"] / ind["decoded_tokens"], 4),
                "speedup": round(ind["wall_seconds"] / tree["wall_seconds"], 4),
                "speedups": [round(r, 3) for r in ratios],
            })
            print(json.dumps({k: rows[-1][k] for k in ("task", "width", "measured_saving", "speedup")}), flush=True)
    return rows


def set_eos_rows(result: dict, rows: list[dict]) -> None:
    """Store the rows (replacing earlier rows of the same answers and width), and as `eos_on` (the row earlier
    runs reported) the short-answer w=8 one."""
    new = {(r["answers"], r["width"]) for r in rows}
    rows = [r for r in result.get("eos_on_rows", []) if (r["answers"], r["width"]) not in new] + rows
    result["eos_on_rows"] = sorted(rows, key=lambda r: (r["answers"] != "short", r["width"]))
    short = next((r for r in result["eos_on_rows"] if r["answers"] == "short" and r["width"] == 8), None)
    if short is not None:
        result["eos_on"] = short
    command = " ".join([".venv/bin/python", *sys.argv])
    result["commands_eos_on_rows"] = [c for c in result.get("commands_eos_on_rows", []) if c != command] + [command]
    result.pop("command_eos_on_rows", None)
    result.pop("command_eos_on", None)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax3, ax2) = plt.subplots(1, 3, figsize=(16, 4.4))
    labels, tree_s, ind_s = [], [], []
    for w in (8, 16):
        r = result[f"w{w}"]
        labels.append(f"w={w}")
        tree_s.append(r["tree"]["wall_seconds"])
        ind_s.append(r["independent"]["wall_seconds"])
    x = range(len(labels))
    ax1.bar([i - 0.2 for i in x], ind_s, 0.4, label="independent", color="#999999")
    ax1.bar([i + 0.2 for i in x], tree_s, 0.4, label="tree (TreePO)", color="#2a7ab9")
    for i, w in enumerate((8, 16)):
        ax1.annotate(f"{result[f'speedup_w{w}']:.2f}x faster\n{result.get(f'saving_w{w}', 0):.0%} fewer tokens",
                     (i + 0.2, tree_s[i]), ha="center", va="bottom", fontsize=9)
    ax1.set_xticks(list(x), labels)
    ax1.set_ylabel("wall seconds (8 prompts, depth 4 x 32 tokens)")
    ax1.set_title("No early stops (EOS off), SmolLM2-135M, CPU")
    ax1.legend()
    rows = result.get("eos_on_rows", [])
    names = [f"{r['answers']}\nw={r['width']}" for r in rows]
    ax3.bar([i - 0.2 for i in range(len(rows))], [r["independent"]["decoded_tokens"] for r in rows], 0.4,
            label="independent", color="#999999")
    ax3.bar([i + 0.2 for i in range(len(rows))], [r["tree"]["decoded_tokens"] for r in rows], 0.4,
            label="tree (default sampler)", color="#2a7ab9")
    for i, r in enumerate(rows):
        ax3.annotate(f"{r['measured_saving']:.0%} fewer\n{r['speedup']:.2f}x faster\n"
                     f"{r['tree']['distinct_leaves_per_group']:.1f}/{r['width']} distinct",
                     (i + 0.2, r["tree"]["decoded_tokens"]), ha="center", va="bottom", fontsize=8)
    ax3.set_xticks(range(len(rows)), names)
    ax3.set_ylabel("decoded tokens (EOS on, all seeds)")
    ax3.set_title("EOS on: short and long answers")
    ax3.legend(fontsize=8)
    ax2.bar(["HF generate", "treepo engine"], [result["generate_tokens_per_s"], result["engine_tokens_per_s"]],
            color=["#999999", "#2a7ab9"])
    ax2.set_ylabel("new tokens / s (batch 16, 128 tokens)")
    ax2.set_title(f"Engine vs generate: {result['engine_vs_generate']:.2f}x")
    save_png(fig, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8, help="gsm_symbolic prompts per rollout")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats; the median ratio is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results", help="folder for rollout_speed.json / .png")
    parser.add_argument("--only", choices=["eos_on_rows"], default=None, help="run just these rows, keep the others")
    parser.add_argument("--eos-prompts", type=int, default=8, help="prompts per task of the eos_on_rows")
    parser.add_argument("--answers", default="short,long", help="which eos_on_rows to run: short, long or both; "
                                                                  "rows not run are kept from an existing JSON")
    args = parser.parse_args()
    out = Path(args.out)
    if args.only == "eos_on_rows":
        result = io.read_json(out / "rollout_speed.json") if (out / "rollout_speed.json").is_file() else {}
        engine = load_engine(EngineConfig(), seed=args.seed)
        set_eos_rows(result, eos_on_rows(engine, args))
        io.write_json(out / "rollout_speed.json", result)
        plot(result, out / "rollout_speed.png")
        return 0

    engine = load_engine(EngineConfig(ignore_eos=True), seed=args.seed)
    prompts = [render(p, engine.tokenizer, SYSTEM) for p in load_task("gsm_symbolic", max(args.prompts, 16), args.seed)]
    batch = prompts[: args.prompts]
    rollout(engine, batch[:2], "tree", 4, args.seed)  # warm-up: allocator, thread pool, lean-decoder check

    result: dict = {"command": " ".join([".venv/bin/python", *sys.argv]), "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, float32)",
                    "decoder": engine.decoder.name, "prompts": args.prompts, "depth": 4, "segment_len": 32,
                    "branching": 2, "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                                "torch": torch.__version__, "python": platform.python_version()}}
    for w in (8, 16):
        runs = {"tree": [], "independent": []}
        for _ in range(args.repeats):
            for mode in ("tree", "independent"):
                runs[mode].append(rollout(engine, batch, mode, w, args.seed))
                print(f"w={w} {mode}: {runs[mode][-1]['wall_seconds']:.1f} s, "
                      f"{runs[mode][-1]['decoded_tokens']} decoded tokens", flush=True)
        ratios = [i["wall_seconds"] / t["wall_seconds"] for t, i in zip(runs["tree"], runs["independent"])]
        result[f"w{w}"] = {"tree": runs["tree"][-1], "independent": runs["independent"][-1], "speedups": ratios}
        result[f"speedup_w{w}"] = round(statistics.median(ratios), 3)
        result[f"saving_w{w}"] = runs["tree"][-1]["saving_vs_own_leaves"]
        result[f"bound_w{w}"] = runs["tree"][-1]["bound_saving_ratio"]

    gen, eng = [], []
    for _ in range(args.repeats):
        eng.append(engine_throughput(engine, prompts[:16], 128))
        gen.append(generate_throughput(engine.model, engine.tokenizer, prompts[:16], 128))
        print(f"batch 16: engine {eng[-1]:.1f} tok/s, generate {gen[-1]:.1f} tok/s", flush=True)
    result["engine_tokens_per_s"] = round(statistics.median(eng), 2)
    result["generate_tokens_per_s"] = round(statistics.median(gen), 2)
    result["engine_vs_generate"] = round(statistics.median(e / g for e, g in zip(eng, gen)), 3)
    set_eos_rows(result, eos_on_rows(TransformersEngine(engine.model, engine.tokenizer, EngineConfig(), seed=args.seed), args))
    io.write_json(out / "rollout_speed.json", result)
    plot(result, out / "rollout_speed.png")
    print({k: result[k] for k in ("speedup_w8", "speedup_w16", "saving_w16", "bound_w16", "engine_vs_generate")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
