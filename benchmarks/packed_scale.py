"""Packed training at the paper's scale: how far each attention path goes before memory runs out.

    .venv/bin/python benchmarks/packed_scale.py        # run alone: it times passes and fills memory

One synthetic tree of TreePO's shape (`treepo.tiny.paper_shape_samples`): a 256-token prompt, 16 leaves,
14 segments of `seg` tokens per path, binary forks at the first four segments (2, 4, 8, then 16 paths:
190 segments in all), so a packed row holds
N = 256 + 190 * seg unique tokens and the flat layout 16 rows of 256 + 14 * seg. The model has
SmolLM2-135M's width (hidden 576, 9 query / 3 key-value heads, MLP 1536, vocabulary 49,152) and
2 layers, random weights, float32. One training pass = forward, PPO loss, backward, through:

- flat:  16 padded rows (sdpa attention, whose CPU kernel keeps no N x N scores);
- dense: one packed row with the additive [1, 1, N, N] tree mask (sdpa);
- flex:  one packed row with the FlexAttention BlockMask of the same rule (`train.tree_attention`).
         On CPU, FlexAttention has no backward pass (PyTorch 2.13), so the BlockMask runs through
         treepo's block-sparse kernel; on CUDA the trainer would run FlexAttention's own kernel.

Each (path, seg) runs in a fresh process whose address space is capped at `--memory-gb` (so a path
that needs more fails with an allocation error instead of waking the kernel's OOM killer); it reports
peak resident memory (VmHWM) and seconds. A path stops growing at its first failure. Finished points
are kept in the JSON and skipped on a rerun. The log-probs of flex and dense (or flat) are compared
where both ran. Results go under `scale` in benchmarks/results/packed_training.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from treepo import io
from treepo.gpu_check.scale import scale_model
from treepo.tiny import PAPER_SHAPE, paper_shape_samples, paper_shape_tokens

SEGS = (16, 48, 96, 192, 256)  # N = 3,296 / 9,376 / 18,496 / 36,736 / 48,896 unique tokens
PATHS = ("flex", "dense", "flat")
RESULTS = Path("benchmarks/results/packed_training.json")
LEAVES, PROMPT, DEPTH = PAPER_SHAPE["leaves"], PAPER_SHAPE["prompt"], PAPER_SHAPE["depth"]


def peak_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def child(path: str, seg: int, memory_gb: float, logprobs_out: str) -> dict:
    """One training pass through `path` on the tree of segment `seg`, in this (fresh) process."""
    from treepo.train.logprobs import collate, response_logprobs
    from treepo.train.loss import ppo_loss
    from treepo.train.packing import pack_samples, packed_logprobs

    limit = int(memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    m = scale_model()
    samples = paper_shape_samples(seg, m.config.vocab_size)
    start = time.perf_counter()
    try:
        if path == "flat":
            batch = collate(samples, 0)
            logp, _ = response_logprobs(m, batch)
        else:
            packed = pack_samples(samples, 0, attention="blocks" if path == "flex" else "dense")
            batch = packed.flat
            logp, _ = packed_logprobs(m, packed)
        parts = ppo_loss(logp, batch.old_logprobs, batch.advantages, batch.response_mask,
                         float(batch.response_mask.sum()))
        parts.loss.backward()
    except (RuntimeError, MemoryError) as e:  # an allocation past the cap
        return {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", "peak_gb": peak_gb()}
    seconds = time.perf_counter() - start
    torch.save(logp.detach()[batch.response_mask], logprobs_out)
    return {"ok": True, "seconds": round(seconds, 2), "peak_gb": round(peak_gb(), 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory-gb", type=float, default=22.0, help="address-space cap per pass (the machine has 24)")
    parser.add_argument("--segs", default=",".join(map(str, SEGS)), help="segment lengths to try, growing")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--child", nargs=3, metavar=("PATH", "SEG", "LOGPROBS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.memory_gb, args.child[2])))
        return 0

    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    points: dict = result.get("scale_points", {})
    segs = [int(s) for s in args.segs.split(",")]
    logdir = Path("benchmarks/results/.scale_logprobs")
    logdir.mkdir(parents=True, exist_ok=True)
    cap = f"/{args.memory_gb:g}"
    for path in PATHS:
        for seg in segs:
            key = f"{path}/{seg}{cap}"
            if any(k.endswith(cap) and p["path"] == path and p["seg"] < seg and not p["ok"] for k, p in points.items()):
                break  # a smaller tree already ran out of memory on this path
            if key not in points:
                lp = logdir / f"{path}-{seg}.pt"
                t0 = time.perf_counter()
                res = subprocess.run([sys.executable, __file__, "--memory-gb", str(args.memory_gb),
                                      "--child", path, str(seg), str(lp)], capture_output=True, text=True)
                lines = res.stdout.strip().splitlines()
                point = json.loads(lines[-1]) if res.returncode == 0 and lines else {
                    "ok": False, "error": f"exit {res.returncode}: {res.stderr.strip().splitlines()[-1:]}"}
                point.update(path=path, seg=seg, tokens=paper_shape_tokens(seg),
                             flat_tokens=LEAVES * (PROMPT + DEPTH * seg), wall_seconds=round(time.perf_counter() - t0, 1))
                points[key] = point
                result["scale_points"] = points
                io.write_json(out, result)  # each finished point is kept
                print(f"{path:5s} seg {seg:3d}: N={point['tokens']:6d} {point}", flush=True)
            if not points[key]["ok"]:
                break
    # summary in the schema: the largest N each path handled, with its memory and time
    scale: dict = {"cap_gb": args.memory_gb, "model": "SmolLM2-135M width, 2 layers, float32, CPU",
                   "flex_path": "FlexAttention BlockMask; on CPU run by treepo's block-sparse kernel (FlexAttention "
                                "has no CPU backward in torch 2.13)", "points": sorted(
                                    (p for k, p in points.items() if k.endswith(cap)), key=lambda p: (p["path"], p["tokens"]))}
    for path in PATHS:
        done = [p for p in scale["points"] if p["path"] == path and p["ok"]]
        best = max(done, key=lambda p: p["tokens"]) if done else None
        failed = [p for p in scale["points"] if p["path"] == path and not p["ok"]]
        scale[path] = {"max_tokens": best["tokens"] if best else 0, "peak_gb": best["peak_gb"] if best else None,
                       "seconds": best["seconds"] if best else None,
                       "first_failure_tokens": failed[0]["tokens"] if failed else None}
    diffs = []
    for seg in sorted({p["seg"] for p in scale["points"]}):
        flex = logdir / f"flex-{seg}.pt"
        for other in ("dense", "flat"):
            ref = logdir / f"{other}-{seg}.pt"
            if flex.exists() and ref.exists():
                diffs.append(float((torch.load(flex) - torch.load(ref)).abs().max()))
    result["scale"] = scale
    result["flex_max_logprob_diff"] = max(diffs) if diffs else None
    result["scale_command"] = " ".join([".venv/bin/python", *sys.argv])
    io.write_json(out, result)
    print(json.dumps({k: scale[k] for k in PATHS}, indent=1), "\nflex_max_logprob_diff", result["flex_max_logprob_diff"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
