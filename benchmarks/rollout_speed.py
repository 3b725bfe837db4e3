"""Rollout speed: tree vs independent sampling, and the embedded engine vs HF `generate`.

    .venv/bin/python benchmarks/rollout_speed.py            # about 5 minutes on 2 CPU cores

In one process on SmolLM2-135M-Instruct (the default model), with the same prompts and seed:
1. tree vs independent at width 8 and 16: depth 4, segment 32, branching 2, no early stops
   (ignore EOS, no answer or repetition stop), so every path decodes its full 128 tokens and the
   decoded-token saving must equal the structural bound;
2. the embedded engine vs `model.generate` decoding 128 sampled tokens for a batch of 16 prompts
   (prefill included in both);
3. `eos_on`, the realistic row: EOS on, answers stopping where the model stops them, on the training
   task (letter_counting, 1-3 words, its brief-answer system prompt) with `treepo train`'s sampler
   (`TrainSamplerConfig`: depth 4 x 64, fan-out 2..8, w=8), tree vs independent on the same prompts
   and seeds: decoded tokens, wall time, mean answer tokens, the measured saving against independent
   sampling (`compare_modes`) next to the structural one against the tree's own leaves.
   `--only eos_on` runs just this row and keeps the other rows of an existing JSON.
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
from pathlib import Path

import torch

from treepo import io
from treepo.viz.plots import save_png
from treepo.rollout.accounting import summarize
from treepo.config import DEFAULT_TRAIN_SYSTEM_PROMPT, EASY_TASK, EASY_TASK_ARGS, EngineConfig, SamplerConfig, TrainSamplerConfig
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


def eos_on(engine, args) -> dict:
    """Tree vs independent with EOS on, on the training task and sampler: summed over repeats (seeds)."""
    prompts = [render(p, engine.tokenizer, DEFAULT_TRAIN_SYSTEM_PROMPT)
               for p in load_task(EASY_TASK, args.eos_prompts, args.seed, parse_task_args(EASY_TASK_ARGS))]
    runs: dict[str, list[dict]] = {"tree": [], "independent": []}
    for rep in range(max(args.repeats, 2)):
        for mode in ("tree", "independent"):
            cfg = TrainSamplerConfig(mode=mode, width=8, seed=args.seed + rep)
            runs[mode].append(summarize([TreeSampler(cfg, engine).rollout(prompts)], cfg))
            print(f"eos_on {mode} seed {args.seed + rep}: {runs[mode][-1]['wall_seconds']:.1f} s, "
                  f"{runs[mode][-1]['decoded_tokens']} decoded tokens", flush=True)

    def total(side: list[dict]) -> dict:
        n = sum(r["trajectories"] for r in side)
        return {"decoded_tokens": sum(r["decoded_tokens"] for r in side), "leaf_tokens": sum(r["leaf_tokens"] for r in side),
                "wall_seconds": round(sum(r["wall_seconds"] for r in side), 3), "trajectories": n,
                "mean_response_tokens": round(sum(r["leaf_tokens"] for r in side) / n, 2),
                "trajectories_per_second": round(n / sum(r["wall_seconds"] for r in side), 3),
                "decoded_tokens_per_second": round(sum(r["decoded_tokens"] for r in side)
                                                   / sum(r["wall_seconds"] for r in side), 2),
                "saving_vs_own_leaves": round(1 - sum(r["decoded_tokens"] for r in side)
                                              / sum(r["leaf_tokens"] for r in side), 4)}

    row = compare_modes(total(runs["tree"]), total(runs["independent"]))
    ratios = [i["wall_seconds"] / t["wall_seconds"] for t, i in zip(runs["tree"], runs["independent"])]
    row.update({"speedups": [round(r, 3) for r in ratios], "speedup_median": round(statistics.median(ratios), 3),
                "task": f"{EASY_TASK} {EASY_TASK_ARGS}", "prompts": len(prompts), "seeds": len(runs["tree"]),
                "sampler": "TrainSamplerConfig(width=8): depth 4 x 64, fan-out 2..8, budget transfer"})
    return row


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
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
        r = result[f"w{w}"]
        ax1.annotate(f"{result[f'speedup_w{w}']:.2f}x faster\n{r['tree']['saving_vs_own_leaves']:.0%} fewer tokens",
                     (i + 0.2, tree_s[i]), ha="center", va="bottom", fontsize=9)
    ax1.set_xticks(list(x), labels)
    ax1.set_ylabel("wall seconds (8 prompts, depth 4 x 32 tokens)")
    ax1.set_title("Tree vs independent rollout, SmolLM2-135M, CPU")
    ax1.legend()
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
    parser.add_argument("--only", choices=["eos_on"], default=None, help="run just this row, keep the others")
    parser.add_argument("--eos-prompts", type=int, default=16, help="letter_counting prompts of the eos_on row")
    args = parser.parse_args()
    out = Path(args.out)
    if args.only == "eos_on":
        result = io.read_json(out / "rollout_speed.json") if (out / "rollout_speed.json").is_file() else {}
        engine = load_engine(EngineConfig(), seed=args.seed)
        result["eos_on"] = eos_on(engine, args)
        result["command_eos_on"] = " ".join([".venv/bin/python", *sys.argv])
        io.write_json(out / "rollout_speed.json", result)
        print(json.dumps({k: result["eos_on"][k] for k in ("measured_saving", "speedup")}))
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
    result["eos_on"] = eos_on(TransformersEngine(engine.model, engine.tokenizer, EngineConfig(), seed=args.seed), args)
    io.write_json(out / "rollout_speed.json", result)
    plot(result, out / "rollout_speed.png")
    print({k: result[k] for k in ("speedup_w8", "speedup_w16", "saving_w16", "bound_w16", "engine_vs_generate")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
