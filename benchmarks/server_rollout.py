"""Tree vs independent sampling through a real completions server (llama-cpp-python, SmolLM2 Q4_1).

    .venv/bin/python benchmarks/server_rollout.py        # about 5 minutes on 2 CPU cores

Starts `python -m llama_cpp.server` on loopback with the default model's GGUF (one thread), then in
one run, with the same prompts and seed, rolls out tree and independent sampling at width 8 and 16
(depth 4, segment 16, branching 2, no early stops: ignore EOS, no answer or repetition stop) through
the server engine, interleaved, and reports the wall-time ratio independent / tree per width.

llama-cpp-python keeps the KV of one sequence and reuses its longest common prefix with the next
prompt; it does not report that reuse, so `estimated_reused_prompt_tokens` replays the requests in
the order they were sent (concurrency 1 keeps that order) and sums the common prefixes. Writes
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
from treepo.engines.local_server import LocalLlamaServer
from treepo.engines.loading import load_engine, smollm2_gguf
from treepo.prompts import load_task, render
from treepo.rollout.sampler import TreeSampler

SYSTEM = "You are a helpful assistant. Reason step by step, then give the final answer in the form \\boxed{ANSWER}."


class Recorder:
    """Wraps the engine's generate to keep (context, output) of every request in sending order."""

    def __init__(self, engine):
        self.engine, self.sent = engine, []
        self._generate = engine.generate
        engine.generate = self

    def __call__(self, requests):
        outputs = self._generate(requests)
        self.sent += [(r.context_ids(), o.token_ids) for r, o in zip(requests, outputs)]
        return outputs

    def reused_prefix_tokens(self, start: int) -> int:
        """Prompt tokens a one-sequence prefix cache could skip for the requests sent since `start`."""
        total = 0
        for k in range(max(start, 1), len(self.sent)):
            before = self.sent[k - 1][0] + self.sent[k - 1][1]
            context = self.sent[k][0]
            common = next((i for i, (a, b) in enumerate(zip(before, context)) if a != b), min(len(before), len(context)))
            total += min(common, len(context) - 1)  # the last prompt token is always evaluated again
        return total


def rollout(engine, recorder, prompts, mode: str, width: int, segment: int, seed: int) -> dict:
    cfg = SamplerConfig(mode=mode, width=width, depth=4, segment_len=segment, branching=2, seed=seed,
                        answer_policy="none", rep_count=0)
    engine.pool.reset_stats()
    start, retokenized = len(recorder.sent), engine.retokenized_contexts
    summary = summarize([TreeSampler(cfg, engine).rollout(prompts)], cfg)
    server = engine.pool.report()[0]
    summary.update(requests=server["requests"], server_prompt_tokens=server["prompt_tokens"],
                   server_completion_tokens=server["completion_tokens"],
                   cached_prompt_tokens=server["cached_prompt_tokens"],
                   estimated_reused_prompt_tokens=recorder.reused_prefix_tokens(start),
                   retokenized_contexts=engine.retokenized_contexts - retokenized)
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
    ax.set_title("Tree vs independent through llama_cpp.server (SmolLM2 Q4_1)")
    ax.set_ylim(0, max(ind_s) * 1.3)
    ax.legend(loc="upper left")
    save_png(fig, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=2, help="gsm_symbolic prompts per rollout")
    parser.add_argument("--segment-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats; the median ratio is reported")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads of the server")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results", help="folder for server_rollout.json / .png")
    args = parser.parse_args()

    out = Path(args.out)
    with LocalLlamaServer(smollm2_gguf(), threads=args.threads, log_path=Path(tempfile.gettempdir()) / "treepo_server_rollout.log") as server:
        engine = load_engine(EngineConfig(engine="server", server_url=[server.url], ignore_eos=True,
                                          server_concurrency=1), seed=args.seed)
        recorder = Recorder(engine)
        prompts = [render(p, engine.tokenizer, SYSTEM) for p in load_task("gsm_symbolic", args.prompts, args.seed)]
        rollout(engine, recorder, prompts[:1], "tree", 2, 4, args.seed)  # warm-up
        result: dict = {
            "command": " ".join([".venv/bin/python", *sys.argv]),
            "server": "llama-cpp-python llama_cpp.server (one sequence, prefix reuse with the previous request)",
            "model": "SmolLM2-135M-Instruct Q4_1 GGUF", "dialect": engine.dialect, "prompts": args.prompts,
            "depth": 4, "segment_len": args.segment_len, "branching": 2, "server_threads": args.threads,
            "concurrency": 1, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                          "load_average_at_start": os.getloadavg()},
            "cached_prompt_tokens_note": "llama-cpp-python does not report cached prompt tokens (null); "
                                         "estimated_reused_prompt_tokens replays its one-sequence prefix reuse",
        }
        for w in (8, 16):
            runs = {"tree": [], "independent": []}
            for _ in range(args.repeats):
                for mode in ("tree", "independent"):
                    started = time.perf_counter()
                    runs[mode].append(rollout(engine, recorder, prompts, mode, w, args.segment_len, args.seed))
                    r = runs[mode][-1]
                    print(f"w={w} {mode}: {time.perf_counter() - started:.1f} s, {r['decoded_tokens']} decoded tokens, "
                          f"{r['requests']} requests, ~{r['estimated_reused_prompt_tokens']} reused prompt tokens",
                          flush=True)
            ratios = [i["wall_seconds"] / t["wall_seconds"] for t, i in zip(runs["tree"], runs["independent"])]
            result[f"w{w}"] = {"tree": runs["tree"][-1], "independent": runs["independent"][-1], "speedups": ratios}
            result[f"speedup_w{w}"] = round(statistics.median(ratios), 3)
            result[f"saving_w{w}"] = runs["tree"][-1]["saving_vs_own_leaves"]
            result[f"bound_w{w}"] = runs["tree"][-1]["bound_saving_ratio"]
        result["machine"]["load_average_at_end"] = os.getloadavg()
        engine.close()

    io.write_json(out / "server_rollout.json", result)
    plot(result, out / "server_rollout.png")
    print({k: result[k] for k in ("speedup_w8", "speedup_w16", "saving_w8", "saving_w16", "bound_w16")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
