"""Packed vs flat training passes: forward + PPO-loss backward on trees from a real rollout.

    .venv/bin/python benchmarks/packed_training.py          # about 6 minutes on 2 CPU cores

On SmolLM2-135M-Instruct (the default model): a tree rollout of gsm_symbolic prompts at width 16
and at width 8 (depth 4, segment 32, the default stopping rules), then, for each tree, the
training pass of its trajectories (forward, `ppo_loss`, backward) run two ways:

- flat: one padded row per trajectory (`train.logprobs.collate`), the trainer's micro-batch of one tree;
- packed: one row of the tree's unique tokens with the dense [1, 1, N, N] tree mask (`packing.pack_samples`);
- blocks: the same row with the tree mask as a FlexAttention BlockMask, run by treepo's block-sparse
  kernel (`train.tree_attention`; memory that grows with N, see benchmarks/packed_scale.py).

The pairs run interleaved, `--repeats` times; the reported speedup is the median over trees and
repeats of flat seconds / packed seconds (ratios within one run: this machine is noisy), and blocks
against packed (dense) the same way. Also
reported: unique / flat tokens, the largest log-prob difference, and peak memory of one pass of
the largest tree per mode (CUDA: max allocated; CPU: peak RSS growth, each mode in a fresh
process). Writes benchmarks/results/packed_training.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from treepo import io, tiny
from treepo.viz.plots import save_png
from treepo.config import EngineConfig, SamplerConfig
from treepo.train.loss import ppo_loss
from treepo.engines.loading import load_engine, load_model
from treepo.train.packing import pack_samples, packed_logprobs
from treepo.train.logprobs import Sample, collate, response_logprobs
from treepo.prompts import load_task, render
from treepo.rollout.sampler import TreeSampler
from treepo.tree import PromptTree

SYSTEM = "You are a helpful assistant. Reason step by step, then give the final answer in the form \\boxed{ANSWER}."


tree_samples = tiny.tree_samples  # one home: treepo.tiny


def train_pass(model, samples: list[Sample], mode: str, pad_id: int) -> tuple[float, torch.Tensor]:
    """Seconds of forward + loss + backward, and the log-probs [S, R]."""
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    if mode == "flat":
        batch = collate(samples, pad_id).to(device)
        logp, _ = response_logprobs(model, batch)
    else:
        packed = pack_samples(samples, pad_id, dtype=next(model.parameters()).dtype,
                              attention="blocks" if mode == "blocks" else "dense").to(device)
        batch = packed.flat
        logp, _ = packed_logprobs(model, packed)
    normaliser = float(batch.response_mask.sum())
    parts = ppo_loss(logp, batch.old_logprobs, batch.advantages, batch.response_mask, normaliser)
    parts.loss.backward()
    sync()
    return time.perf_counter() - start, logp.detach().float().cpu()


def peak_memory(model, samples, mode: str, pad_id: int) -> float:
    """MB of memory one pass needs beyond what the loaded model holds."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_pass(model, samples, mode, pad_id)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    rss = lambda: int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # noqa: E731
    base, peak, done = rss(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    train_pass(model, samples, mode, pad_id)
    done.set()
    t.join()
    return (max(peak[0], rss()) - base) / 2**20


def memory_child(args) -> int:
    """`--memory-of MODE --trees FILE`: one pass of the largest tree in a fresh process; print MB."""
    model, tok = load_model(EngineConfig(device=args.device))
    model.train()
    tree = PromptTree.from_dict(json.loads(Path(args.trees).read_text()))
    print(json.dumps({"mb": peak_memory(model, tree_samples(tree, 0), args.memory_of, tok.pad_token_id or 0)}))
    return 0


def measure_memory(tree: PromptTree, device: str) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(tree.to_dict(), f)
    out = {}
    try:
        for mode in ("flat", "packed"):
            res = subprocess.run([sys.executable, __file__, "--memory-of", mode, "--trees", f.name, "--device", device],
                                 capture_output=True, text=True, check=True)
            out[f"peak_memory_mb_{mode}"] = round(json.loads(res.stdout.strip().splitlines()[-1])["mb"], 1)
    finally:
        os.unlink(f.name)
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = result["widths"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = range(len(widths))
    flat = [result[f"w{w}"]["flat_seconds_median"] for w in widths]
    packed = [result[f"w{w}"]["packed_seconds_median"] for w in widths]
    ax1.bar([i - 0.2 for i in x], flat, 0.4, label="flat rows", color="#999999")
    ax1.bar([i + 0.2 for i in x], packed, 0.4, label="tree-packed", color="#2a7ab9")
    for i, w in enumerate(widths):
        ax1.annotate(f"{result[f'speedup_w{w}']:.2f}x faster\n{result[f'token_ratio_w{w}']:.0%} of the tokens",
                     (i + 0.2, packed[i]), ha="center", va="bottom", fontsize=9)
    ax1.set_xticks(list(x), [f"w={w}" for w in widths])
    ax1.set_ylabel("seconds per tree (forward + backward)")
    ax1.set_title("Training pass per tree, SmolLM2-135M")
    ax1.legend()
    ax2.bar(["flat", "packed"], [result["peak_memory_mb_flat"], result["peak_memory_mb_packed"]],
            color=["#999999", "#2a7ab9"])
    ax2.set_ylabel("peak memory of one pass (MB)")
    ax2.set_title(f"Largest w={result.get('memory_tree_width', 16)} tree (forward + backward)")
    save_png(fig, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=3, help="gsm_symbolic prompts (trees) per width")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats per tree")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--out", default="benchmarks/results", help="folder for packed_training.json / .png")
    parser.add_argument("--memory-of", choices=["flat", "packed"], help=argparse.SUPPRESS)
    parser.add_argument("--trees", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        return memory_child(args)

    engine = load_engine(EngineConfig(device=args.device), seed=args.seed)
    model, pad_id = engine.model, engine.tokenizer.pad_token_id or 0
    prompts = [render(p, engine.tokenizer, SYSTEM) for p in load_task("gsm_symbolic", args.prompts, args.seed)]
    result: dict = {
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, float32)", "device": str(model.device),
        "attn_implementation": model.config._attn_implementation, "prompts": args.prompts, "depth": 4,
        "segment_len": 32, "repeats": args.repeats, "widths": [16, 8],
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
    }
    largest = None
    max_diff = max_block_diff = 0.0
    for w in result["widths"]:
        cfg = SamplerConfig(width=w, depth=4, segment_len=32, seed=args.seed)
        t0 = time.perf_counter()
        trees = TreeSampler(cfg, engine).rollout(prompts).trees
        print(f"w={w}: rolled out {len(trees)} trees in {time.perf_counter() - t0:.0f} s", flush=True)
        model.train()  # dropout is 0 in this model; train mode as the trainer runs it
        train_pass(model, tree_samples(trees[0], 0), "packed", pad_id)  # warm-up
        flat_s, packed_s, blocks_s, ratios, block_ratios, flat_tok, packed_tok = [], [], [], [], [], 0, 0
        for k, tree in enumerate(trees):
            samples = tree_samples(tree, k)
            packed = pack_samples(samples, pad_id)
            flat_tok += packed.flat_tokens
            packed_tok += packed.packed_tokens
            for _ in range(args.repeats):
                tf, lf = train_pass(model, samples, "flat", pad_id)
                tp, lp = train_pass(model, samples, "packed", pad_id)
                tb, lb = train_pass(model, samples, "blocks", pad_id)
                mask = collate(samples, pad_id).response_mask
                max_diff = max(max_diff, float((lf - lp).abs()[mask].max()))
                max_block_diff = max(max_block_diff, float((lf - lb).abs()[mask].max()))
                flat_s.append(tf)
                packed_s.append(tp)
                blocks_s.append(tb)
                ratios.append(tf / tp)
                block_ratios.append(tp / tb)
            print(f"  tree {k}: {len(samples)} trajectories, {packed.flat_tokens} flat -> {packed.packed_tokens} "
                  f"unique tokens; flat {statistics.median(flat_s[-args.repeats:]):.2f} s, packed "
                  f"{statistics.median(packed_s[-args.repeats:]):.2f} s", flush=True)
            if w == 16 and (largest is None or packed.flat_tokens > largest[1]):
                largest = (tree, packed.flat_tokens)
        model.eval()
        result[f"w{w}"] = {"trees": len(trees), "trajectories": sum(len(t.leaves) for t in trees),
                           "flat_tokens": flat_tok, "packed_tokens": packed_tok,
                           "flat_seconds_median": round(statistics.median(flat_s), 3),
                           "packed_seconds_median": round(statistics.median(packed_s), 3), "speedups": ratios,
                           "blocks_seconds_median": round(statistics.median(blocks_s), 3),
                           "blocks_vs_dense_speedups": block_ratios}
        result[f"speedup_w{w}"] = round(statistics.median(ratios), 3)
        result[f"blocks_vs_dense_speedup_w{w}"] = round(statistics.median(block_ratios), 3)
        result[f"token_ratio_w{w}"] = round(packed_tok / flat_tok, 4)
    result["max_logprob_diff"] = max_diff
    result["blocks_max_logprob_diff"] = max_block_diff  # block-mask packing vs flat rows
    result.update(measure_memory(largest[0], args.device), memory_tree_width=16)
    out = Path(args.out)
    old = out / "packed_training.json"
    if old.exists():  # keep what benchmarks/packed_scale.py measured
        result.update({k: v for k, v in json.loads(old.read_text()).items() if k.startswith(("scale", "flex_"))})
    io.write_json(out / "packed_training.json", result)
    plot(result, out / "packed_training.png")
    print({k: result[k] for k in ("speedup_w16", "speedup_w8", "blocks_vs_dense_speedup_w16",
                                  "blocks_vs_dense_speedup_w8", "blocks_max_logprob_diff", "token_ratio_w16", "token_ratio_w8",
                                  "max_logprob_diff", "peak_memory_mb_flat", "peak_memory_mb_packed")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
