"""TRL's GRPOTrainer vs TreePOTrainer (treepo.integrations.trl) vs `treepo train`, one run, same work.

    .venv/bin/python benchmarks/trl_adapter.py                 # SmolLM2-135M, 3 steps per arm
    .venv/bin/python benchmarks/trl_adapter.py --steps 1 --max-new-tokens 32   # a quick, reduced run

Every arm trains SmolLM2-135M-Instruct (treepo's local copy, float32 on CPU) from the same weights
on the same conversational prompts (arithmetic with a boxed answer), with the same reward function
(TRL's signature), the same batch (2 prompts x 8 completions, at most --max-new-tokens new tokens),
learning rate and number of steps:

  grpo_trainer    trl.GRPOTrainer with TRL 1.16's defaults (its own transformers generation)
  treepo_trainer  TreePOTrainer: the same script with the two lines changed (depth 4 trees)
  treepo_train    treepo's own trainer (`treepo train`'s Python path), depth 4 x max/4 tokens

Each arm runs in its own process, so its peak RSS (ru_maxrss) is its own. Per arm: seconds per
step (every step's wall time, mean), completion tokens per step (the tokens TRL / treepo trained
on: the completions' lengths) and per second of the whole step (generation + scoring + update),
decoded tokens per step (what the generator sampled: equal to completion tokens for GRPO, the
trees' unique tokens for the tree arms), and the peak RSS. Writes benchmarks/results/trl_adapter.json
with grpo_trainer, treepo_trainer and treepo_train.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = ("grpo_trainer", "treepo_trainer", "treepo_train")
HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "trl_adapter.json"
PROMPTS, WIDTH = 2, 8


def rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        out.append({"prompt": [{"role": "user", "content": f"What is {a} plus {b}? Put the answer in \\boxed{{}}."}],
                    "answer": str(a + b)})
    return out


def correctness(prompts, completions, answer, **kwargs) -> list[float]:
    """TRL's reward signature; completions are message lists (TRL, conversational) or strings (treepo)."""
    out = []
    for completion, truth in zip(completions, answer):
        text = completion[0]["content"] if isinstance(completion, list) else completion
        found = re.findall(r"\\boxed\{([^}]*)\}", text)
        out.append(1.0 if found and found[-1].strip() == str(truth) else 0.0)
    return out


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


# -- the arms (each in its own process) -------------------------------------------------------
def run_trl(arm: str, a) -> dict:
    from datasets import Dataset

    if arm == "grpo_trainer":
        from trl import GRPOConfig as Config, GRPOTrainer as Trainer
        extra = {}
    else:
        from treepo.integrations.trl import TreePOConfig as Config, TreePOTrainer as Trainer
        extra = {"treepo_depth": 4, "treepo_backend": a.treepo_backend}
    args = Config(output_dir=a.scratch, per_device_train_batch_size=PROMPTS * WIDTH, num_generations=WIDTH,
                  max_completion_length=a.max_new_tokens, max_steps=a.steps, learning_rate=1e-6, logging_steps=1,
                  report_to="none", save_strategy="no", bf16=False, use_cpu=True, seed=a.seed, **extra)
    trainer = Trainer(model=model_path(a), reward_funcs=correctness, args=args,
                      train_dataset=Dataset.from_list(rows(PROMPTS * a.steps * 4, a.seed)))
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    logged = [r for r in trainer.state.log_history if "completions/mean_length" in r]
    steps = [r["step_time"] for r in logged]
    completion = [r["completions/mean_length"] * PROMPTS * WIDTH for r in logged]
    decoded = [r.get("treepo/decoded_tokens", c) for r, c in zip(logged, completion)]
    return summary(steps, completion, decoded, wall, extra={"reward_mean": [r["reward"] for r in logged]})


def model_path(a) -> str:
    from treepo.engines.loading import resolve_model_dir

    return str(resolve_model_dir(a.model))


def run_treepo_train(a) -> dict:
    from datasets import Dataset

    from treepo.config import EngineConfig, RewardConfig, TrainConfig, TrainSamplerConfig
    from treepo.train.trainer import Trainer

    data = Path(a.scratch) / "prompts.parquet"
    Dataset.from_list(rows(PROMPTS * a.steps * 4, a.seed)).to_parquet(str(data))
    sys.path.insert(0, str(HERE))
    sampler = TrainSamplerConfig(width=WIDTH, depth=4, segment_len=-(-a.max_new_tokens // 4),
                                 max_response_tokens=a.max_new_tokens, seed=a.seed)
    train = TrainConfig(prompts=str(data), num_prompts=PROMPTS * a.steps * 4, steps=a.steps, prompts_per_step=PROMPTS,
                        learning_rate=1e-6, system_prompt="", out=str(Path(a.scratch) / "run"), tensorboard=False,
                        dynamic_sampling=False, eval_prompts=0)
    trainer = Trainer(EngineConfig(model=model_path(a)), sampler, RewardConfig(reward="trl_adapter:correctness"), train)
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    logged = [r for r in trainer.rows if "step_seconds" in r]
    return summary([r["step_seconds"] for r in logged], [r["leaf_tokens"] for r in logged],
                   [r["decoded_tokens"] for r in logged], wall, extra={"reward_mean": [r["reward_mean"] for r in logged]})


def summary(steps, completion, decoded, wall, extra) -> dict:
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {
        "seconds_per_step": mean(steps),
        "step_seconds": steps,
        "completion_tokens_per_step": mean(completion),
        "completion_tokens_per_second": sum(completion) / sum(steps) if steps else None,
        "decoded_tokens_per_step": mean(decoded),
        "peak_rss_gb": round(peak_rss_gb(), 3),
        "wall_seconds": wall,
        **extra,
    }


def child(a) -> None:
    result = run_treepo_train(a) if a.arm == "treepo_train" else run_trl(a.arm, a)
    Path(a.result).write_text(json.dumps(result))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="smollm2", help="smollm2 (the benchmark) or a model folder (a smoke test)")
    p.add_argument("--treepo-backend", default="hf", help="TreePOTrainer's engine backend (hf = no weight copy)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--arm", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(RESULT))
    a = p.parse_args(argv)
    if a.arm:
        return child(a)
    import torch
    import trl

    results = {}

    def record(complete: bool) -> dict:
        return {
            "setup": {"model": "SmolLM2-135M-Instruct (float32, CPU)" if a.model == "smollm2" else a.model,
                      "prompts_per_step": PROMPTS, "width": WIDTH, "max_new_tokens": a.max_new_tokens,
                      "steps": a.steps, "seed": a.seed, "treepo_backend": a.treepo_backend, "trl": trl.__version__,
                      "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.platform(),
                      "complete": complete},
            **results,
        }

    def write(complete: bool) -> None:  # after every arm, so a run stopped part-way keeps what it measured
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(a.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(record(complete), indent=2) + "\n")
        tmp.replace(a.out)

    for arm in a.arms:
        with tempfile.TemporaryDirectory(prefix=f"trl-adapter-{arm}-") as scratch:
            out = Path(scratch) / "result.json"
            cmd = [sys.executable, __file__, "--arm", arm, "--result", str(out), "--scratch", scratch,
                   "--model", a.model, "--steps", str(a.steps), "--max-new-tokens", str(a.max_new_tokens), "--seed", str(a.seed),
                   "--treepo-backend", a.treepo_backend]
            print(f"[{arm}] {' '.join(cmd[1:])}", flush=True)
            env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"}
            code = subprocess.call(cmd, env=env)
            if code != 0:
                raise SystemExit(f"arm {arm} failed (exit {code}); the arms before it are in {a.out}")
            results[arm] = json.loads(out.read_text())
            print(f"[{arm}] {json.dumps({k: v for k, v in results[arm].items() if not isinstance(v, list)})}",
                  flush=True)
            write(complete=arm == a.arms[-1])
    write(complete=True)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
