"""`python -m treepo.gpu_check`: run the parts, each in its own `try`, and write the JSON after each one.

    python -m treepo.gpu_check --out DIR                 # CUDA: correctness + speed, within --budget seconds
    python -m treepo.gpu_check --out DIR --cpu-dry-run   # the same code on the CPU, toy speed sizes

The JSON (`DIR/gpu_check.json`):

    dry_run, complete, total_seconds, device {type, name, memory, capability, ...}, versions {...},
    parts {name: {status: ok | failed | skipped, seconds, error?, ...figures}}, summary {ok, failed, skipped}

A part that raises is marked failed with its error (the traceback goes to the log) and the next
part runs. Parts that would start after the time budget are skipped; SIGTERM (the script's
`timeout`) fails the running part, skips the rest and still writes the JSON. Exit status: 0 when
every part that ran is ok, 1 when one failed, 2 when there is no CUDA device and no --cpu-dry-run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import signal
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

import torch

from . import correctness, scale
from .models import SPEED_MODELS
from .speed import TOY, SpeedBench, SpeedSizes, sizes_dict

RESULT_FILE = "gpu_check.json"
GPU_BUDGET_S = 400.0  # parts start only within this; the script stops the run at 460 s (+15 s to exit: under 8 minutes)
DRY_BUDGET_S = 100.0
NOT_COVERED = ["multi-process training with NCCL (needs two or more GPUs; tests/test_distributed.py covers gloo on CPU)"]
DRY_RUN_NOTE = ("CPU dry run: the same code paths at toy sizes (tiny speed models, few tokens); its speed figures "
                "and memory (None) say nothing about a GPU")
CUDA_NOTE = "CUDA run: correctness on the tests' tiny models, speed on random models of real shapes"
PACKAGES = ("torch", "transformers", "tokenizers", "accelerate", "numpy", "rich", "matplotlib", "yaml")


class Interrupted(BaseException):
    """SIGTERM arrived (the script's time limit): the running part fails, the rest are skipped."""


def _on_sigterm(signum, frame):
    raise Interrupted("stopped by SIGTERM (the time limit of scripts/gpu_check.sh)")


# ---------------------------------------------------------------------------------------------
# What the machine is
# ---------------------------------------------------------------------------------------------


def device_info(device: torch.device) -> dict:
    info: dict = {"type": device.type, "cuda_available": torch.cuda.is_available(),
                  "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
                  "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda" and info["cuda_available"]:
        try:
            props = torch.cuda.get_device_properties(device)
            info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                        capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                        cudnn=torch.backends.cudnn.version(), tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                        bf16_supported=torch.cuda.is_bf16_supported())
        except Exception as e:  # noqa: BLE001 - the parts will say what works; this only describes the machine
            info["error"] = f"{type(e).__name__}: {e}"
    else:
        info["name"] = platform.processor() or platform.machine()
    return info


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            module = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - a missing package is a finding, not a crash
            out[name] = f"missing ({type(e).__name__})"
            continue
        try:
            out[name] = getattr(module, "__version__", None) or metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "?"
    return out


# ---------------------------------------------------------------------------------------------
# The parts
# ---------------------------------------------------------------------------------------------

Part = tuple[str, Callable[[dict], None], Optional[Callable[[], None]]]  # name, run(report), cleanup after


def plan(device: torch.device, dry_run: bool, only: Optional[list[str]] = None, seed: int = 0) -> list[Part]:
    """Correctness in float32 and bfloat16 first (cheap, most important), then speed, smallest model first."""
    check_every = 4 if device.type == "cpu" else None  # the CPU runs CUDA's host-sync cadence too
    parts: list[Part] = []
    for name, check in correctness.CHECKS.items():
        for dtype in (torch.float32, torch.bfloat16):
            def run(report, check=check, dtype=dtype):
                check(device, dtype, report, check_every=check_every)
            parts.append((f"{name}.{str(dtype).split('.')[-1]}", run, None))
    sizes = TOY if dry_run else SpeedSizes()
    dtype = torch.bfloat16  # what the trainer loads on CUDA ('auto')
    for spec in SPEED_MODELS:
        bench = SpeedBench(spec, device, dtype, sizes, toy=dry_run, seed=seed)
        parts += [(f"speed.{spec.name}.rollout", bench.rollout, None),
                  (f"speed.{spec.name}.decode", bench.decode, None),
                  (f"speed.{spec.name}.training_pass", bench.training_pass, bench.close)]
    # packed training at the paper's tree shape (97,536 unique tokens; toy segments on the CPU dry run)
    parts.append(("speed.packed_scale", lambda report: scale.packed_scale(device, report, seg=8 if dry_run else scale.SEG),
                  None))
    if only:
        parts = [p for p in parts if any(p[0].startswith(prefix) for prefix in only)]
    return parts


def run_parts(parts: list[Part], result: dict, write: Callable[[], None], deadline: float, log=print) -> None:
    """Run each part in its own try; record status, seconds, figures, errors; write the JSON after each."""
    stopped = None
    for name, run, cleanup in parts:
        report: dict = {}
        result["parts"][name] = report
        if stopped or time.monotonic() > deadline:
            report.update(status="skipped", reason=stopped or "the time budget was spent before this part")
            log(f"{name}: skipped ({report['reason']})")
            write()
            continue
        log(f"{name}: running ...")
        t0 = time.perf_counter()
        try:
            run(report)
            report["status"] = "ok"
        except Interrupted as e:
            report.update(status="failed", error=str(e))
            stopped = str(e)
        except Exception as e:  # noqa: BLE001 - one part's failure must not stop the others
            report.update(status="failed", error=f"{type(e).__name__}: {e}")
            log(traceback.format_exc())
        finally:
            if cleanup is not None:
                try:
                    cleanup()
                except Exception:  # noqa: BLE001
                    log(traceback.format_exc())
        report["seconds"] = round(time.perf_counter() - t0, 2)
        head = ("status", "seconds", "error")  # first in the JSON, then the figures
        result["parts"][name] = report = {**{k: report[k] for k in head if k in report},
                                          **{k: v for k, v in report.items() if k not in head}}
        log(f"{name}: {report['status']} in {report['seconds']} s" + (f": {report['error']}" if "error" in report else ""))
        write()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m treepo.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_check.json (default: $OUT)")
    parser.add_argument("--cpu-dry-run", action="store_true", help="run on the CPU at toy speed sizes")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds within which parts may start (default {GPU_BUDGET_S:g}; dry run {DRY_BUDGET_S:g})")
    parser.add_argument("--only", default="", help="comma-separated part-name prefixes, e.g. greedy,speed.smollm2")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if not args.out:
        parser.error("give --out DIR or set OUT")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    budget = args.budget if args.budget is not None else (DRY_BUDGET_S if args.cpu_dry_run else GPU_BUDGET_S)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _run(args, out, started, budget)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args, out: Path, started: float, budget: float) -> int:
    device = torch.device("cpu" if args.cpu_dry_run else "cuda")
    if args.cpu_dry_run:
        torch.set_num_threads(1)  # toy sizes gain nothing from threads, and a busy CI machine loses much to them
    result: dict = {
        "dry_run": args.cpu_dry_run,
        "note": DRY_RUN_NOTE if args.cpu_dry_run else CUDA_NOTE,
        "complete": False,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python -m treepo.gpu_check", *args.argv]),
        "device": device_info(device),
        "versions": versions(),
        "budget_seconds": budget,
        "speed_sizes": sizes_dict(TOY if args.cpu_dry_run else SpeedSizes()),
        "not_covered": NOT_COVERED,
        "parts": {},
    }

    def write() -> None:
        result["total_seconds"] = round(time.monotonic() - started, 2)
        tmp = out / (RESULT_FILE + ".tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
        os.replace(tmp, out / RESULT_FILE)

    if device.type == "cuda" and not torch.cuda.is_available():
        result["error"] = "no CUDA device here (torch.cuda.is_available() is False); run with --cpu-dry-run"
        write()
        print(result["error"], file=sys.stderr)
        return 2
    print(f"treepo GPU check on {result['device'].get('name')} ({device.type}), "
          f"{'dry run, ' if args.cpu_dry_run else ''}budget {budget:g} s; writing {out / RESULT_FILE}", flush=True)
    torch.manual_seed(args.seed)
    parts = plan(device, args.cpu_dry_run, [p for p in args.only.split(",") if p] or None, args.seed)
    try:
        run_parts(parts, result, write, started + budget, log=lambda msg: print(msg, flush=True))
    except Interrupted as e:  # SIGTERM between two parts
        result["interrupted"] = str(e)
    statuses = {name: r["status"] for name, r in result["parts"].items()}
    result["summary"] = {s: [n for n, v in statuses.items() if v == s] for s in ("ok", "failed", "skipped")}
    result["complete"] = True
    write()
    print(json.dumps({"total_seconds": result["total_seconds"],
                      **{s: len(v) for s, v in result["summary"].items()}, "failed": result["summary"]["failed"]}),
          flush=True)
    return 1 if result["summary"]["failed"] else 0
