"""Tree vs independent sampling through a real token-id server: llama.cpp's C++ llama-server.

    bash scripts/build_llama_server.sh                      # once (about 5 minutes on 2 cores)
    .venv/bin/python benchmarks/server_rollout.py           # about 5 minutes on 2 CPU cores

Starts `llama-server` on loopback with the default model's GGUF (SmolLM2-135M Q4_1), `--parallel`
slots with continuous batching and a prompt cache per slot, then in one run, with the same prompts
and seed, rolls out tree and independent sampling at width 8 and 16 (depth 4, segment 16,
branching 2, no early stops: ignore EOS, no answer or repetition stop) through the server engine
with as many requests in flight as the server has slots, interleaved, and reports the wall-time
ratio independent / tree per width. Prompts go out as token ids and the sampled ids come back, so
nothing is re-tokenised; the server reports how many prompt tokens it took from its cache. Writes
benchmarks/results/server_rollout.json and .png.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from treepo import io
from treepo.viz.plots import save_png
from treepo.rollout.accounting import summarize
from treepo.config import EngineConfig, SamplerConfig
from treepo.engines.local_server import LlamaCppServer
from treepo.engines.loading import load_engine, smollm2_gguf
from treepo.prompts import load_task, render
from treepo.rollout.sampler import TreeSampler

SYSTEM = "You are a helpful assistant. Reason step by step, then give the final answer in the form \\boxed{ANSWER}."


def rollout(engine, prompts, mode: str, width: int, segment: int, seed: int) -> dict:
    cfg = SamplerConfig(mode=mode, width=width, depth=4, segment_len=segment, branching=2, seed=seed,
                        answer_policy="none", rep_count=0)
    engine.pool.reset_stats()
    summary = summarize([TreeSampler(cfg, engine).rollout(prompts)], cfg)
    server = engine.pool.report()[0]
    summary.update(requests=server["requests"], server_prompt_tokens=server["prompt_tokens"],
                   server_completion_tokens=server["completion_tokens"],
                   cached_prompt_tokens=server["cached_prompt_tokens"],
                   evaluated_prompt_tokens=server["prompt_tokens"] - (server["cached_prompt_tokens"] or 0))
    return summary


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    widths = (8, 16)
    tree_s = [result[f"w{w}"]["tree"]["wall_seconds"] for w in widths]
    ind_s = [result[f"w{w}"]["independent"]["wall_seconds"] for w in widths]
    x = range(len(widths))
    ax.bar([i - 0.2 for i in x], ind_s, 0.4, label="independent", color="#999999")
    ax.bar([i + 0.2 for i in x], tree_s, 0.4, label="tree (TreePO)", color="#2a7ab9")
    for i, w in enumerate(widths):
        tree = result[f"w{w}"]["tree"]
        ax.annotate(f"{result[f'speedup_w{w}']:.2f}x faster\n{tree['saving_vs_own_leaves']:.0%} fewer tokens\n"
                    f"{tree['requests']} vs {result[f'w{w}']['independent']['requests']} requests",
                    (i + 0.2, tree_s[i]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), [f"w={w}" for w in widths])
    ax.set_ylabel(f"wall seconds ({result['prompts']} prompts, depth 4 x {result['segment_len']} tokens)")
    ax.set_title(f"Tree vs independent through llama-server --parallel {result['parallel']} (SmolLM2 Q4_1)")
    ax.set_ylim(0, max(ind_s) * 1.3)
    ax.legend(loc="upper left")
    save_png(fig, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=2, help="gsm_symbolic prompts per rollout")
    parser.add_argument("--segment-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the median ratio is reported")
    parser.add_argument("--parallel", type=int, default=4, help="llama-server slots (continuous batching)")
    parser.add_argument("--threads", type=int, default=2, help="llama-server CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results", help="folder for server_rollout.json / .png")
    args = parser.parse_args()

    out = Path(args.out)
    log_path = Path(tempfile.gettempdir()) / "treepo_server_rollout.log"
    with LlamaCppServer(smollm2_gguf(), parallel=args.parallel, threads=args.threads, n_ctx=1024,
                        model_name="smollm2", log_path=log_path) as server:
        engine = load_engine(EngineConfig(engine="server", server_url=[server.url], ignore_eos=True,
                                          server_concurrency=args.parallel), seed=args.seed)
        prompts = [render(p, engine.tokenizer, SYSTEM) for p in load_task("gsm_symbolic", args.prompts, args.seed)]
        rollout(engine, prompts[:1], "tree", 2, 4, args.seed)  # warm-up
        result: dict = {
            "command": " ".join([".venv/bin/python", *sys.argv]),
            "server": f"llama-server (llama.cpp's C++ server, built from the llama-cpp-python 0.3.36 sdist's "
                      f"vendor/llama.cpp by scripts/build_llama_server.sh), --parallel {args.parallel}, continuous "
                      "batching, prompt cache per slot",
            "parallel": args.parallel, "concurrency": args.parallel, "server_threads": args.threads,
            "model": "SmolLM2-135M-Instruct Q4_1 GGUF", "dialect": engine.dialect, "kind": engine.server_kind,
            "prompts": args.prompts, "depth": 4, "segment_len": args.segment_len, "branching": 2,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "load_average_at_start": os.getloadavg()},
        }
        for w in (8, 16):
            runs = {"tree": [], "independent": []}
            for _ in range(args.repeats):
                for mode in ("tree", "independent"):
                    started = time.perf_counter()
                    runs[mode].append(rollout(engine, prompts, mode, w, args.segment_len, args.seed))
                    r = runs[mode][-1]
                    print(f"w={w} {mode}: {time.perf_counter() - started:.1f} s, {r['decoded_tokens']} decoded, "
                          f"{r['server_prompt_tokens']} prompt tokens ({r['cached_prompt_tokens']} from the cache), "
                          f"{r['requests']} requests", flush=True)
            ratios = [i["wall_seconds"] / t["wall_seconds"] for t, i in zip(runs["tree"], runs["independent"])]
            tree, ind = runs["tree"][-1], runs["independent"][-1]
            result[f"w{w}"] = {"tree": tree, "independent": ind, "speedups": ratios}
            result[f"speedup_w{w}"] = round(statistics.median(ratios), 3)
            result[f"saving_w{w}"] = tree["saving_vs_own_leaves"]  # = against this run's independent side here:
            # with EOS ignored and no early stops both sides decode `width` full-length paths
            for side, r in (("tree", tree), ("independent", ind)):
                result[f"w{w}"][f"{side}_tokens"] = {"decoded": r["server_completion_tokens"],
                                                     "prompt": r["server_prompt_tokens"],
                                                     "cached_prompt": r["cached_prompt_tokens"],
                                                     "evaluated_prompt": r["evaluated_prompt_tokens"]}
        result["machine"]["load_average_at_end"] = os.getloadavg()
        engine.close()

    io.write_json(out / "server_rollout.json", result)
    plot(result, out / "server_rollout.png")
    print({k: result[k] for k in ("speedup_w8", "speedup_w16", "saving_w8", "saving_w16")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
