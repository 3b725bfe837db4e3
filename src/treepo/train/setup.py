"""What a training run settles before its first step, and the data it steps through.

- `check_configs`, `check_sharding`: setting combinations no single config sees, and launches
  whose weight sharding the rollout engine cannot serve; a ConfigError names the fix;
- `start_serving`: with --engine server, the server engine (and the llama-server treepo starts,
  --launch_server) and the weight sync that pushes each update's weights to the servers;
- `load_training_prompts`: the training pool (a JSONL file or a reasoning-gym task) and the
  held-out problems; `PromptStream`: the pool cycled in a seeded order with a resumable position;
"""

from __future__ import annotations

import logging
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..config import TREE_ESTIMATORS, EngineConfig, RewardConfig, SamplerConfig, TrainConfig, WeightSyncConfig
from ..errors import ConfigError, InputError
from ..prompts import Prompt, choose_prompts, load_heldout, parse_task_args

log = logging.getLogger(__name__)


def check_configs(engine: EngineConfig, sampler: SamplerConfig, reward: RewardConfig, train: TrainConfig) -> None:
    """Combinations no single config can see; a ConfigError names the fields and the fix."""
    if engine.engine == "server":
        from ..engines.server import check_sampler_config

        check_sampler_config(sampler)
        if train.old_logprobs != "recompute":
            raise ConfigError("old_logprobs='engine' with --engine server: a server's log-probs come from another "
                              "forward (quantised, other kernels), so the PPO ratio must use the policy's: use "
                              "--old_logprobs recompute.")
    if sampler.mode == "independent" and train.advantage in TREE_ESTIMATORS:
        raise ConfigError(f"advantage={train.advantage!r} reads subtrees, which --mode independent does not grow: use "
                          "--advantage grpo or unbiased (RLOO on independent samples), or --mode tree.")
    if train.advantage == "unbiased" and train.whitening in ("token", "group"):
        log.warning("advantage='unbiased' with whiten=%r: re-centring undoes the leaf weighting (the gradient is no "
                    "longer unbiased, and wrong answers can get a positive advantage); use --whiten scale or none.",
                    train.whitening)
    if sampler.width < 2:
        raise ConfigError(
            f"width={sampler.width} with advantage={train.advantage!r}: a group of one trajectory has advantage 0 "
            "and nothing to learn; use --width 2 or more."
        )
    if engine.temperature == 0:
        raise ConfigError("temperature=0 (greedy) gives every trajectory of a group the same tokens: "
                          "train with --temperature 1.0 (or > 0).")
    if train.eval_prompts and train.prompts:
        raise ConfigError("eval_prompts needs a reasoning-gym task for its held-out split; with --prompts, "
                          "set --eval_prompts 0 and run `treepo eval --prompts TEST.jsonl` on the result.")


def check_sharding(accelerator) -> None:
    """Each rank's embedded engine generates with the full policy weights, so the weights must not
    be sharded: DDP and DeepSpeed ZeRO-1/2 keep a full copy per rank; FSDP and ZeRO-3 do not."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    stage = getattr(plugin, "zero_stage", 0) if plugin is not None else 0
    if kind == DistributedType.FSDP or (kind == DistributedType.DEEPSPEED and stage == 3):
        what = "FSDP" if kind == DistributedType.FSDP else "DeepSpeed ZeRO-3"
        raise ConfigError(f"{what} shards the weights, but each rank's rollout engine needs all of them: launch with "
                          "DDP (`accelerate launch --multi_gpu`) or DeepSpeed ZeRO stage 1 or 2.")


# ---------------------------------------------------------------------------------------------
# Data: the training pool, cycled in a seeded order, with a resumable position
# ---------------------------------------------------------------------------------------------


@dataclass
class PromptStream:
    prompts: list[Prompt]
    seed: int
    position: int = 0  # prompts handed out so far (across epochs)
    _order: list[int] = field(default_factory=list)
    _epoch: int = -1

    def take(self, n: int) -> list[int]:
        """Indices into `prompts` of the next n problems."""
        out = []
        for _ in range(n):
            epoch, k = divmod(self.position, len(self.prompts))
            if epoch != self._epoch:
                self._order = list(range(len(self.prompts)))
                random.Random(self.seed * 1_000_003 + epoch).shuffle(self._order)
                self._epoch = epoch
            out.append(self._order[k])
            self.position += 1
        return out


def load_training_prompts(train: TrainConfig, reward: RewardConfig, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """(training pool, held-out problems)."""
    if train.prompts:
        pool = choose_prompts(train, seed)
        missing = [i for i, p in enumerate(pool) if p.answer is None]
        if missing and reward.reward in ("auto", "math_verify"):
            raise InputError(f"{train.prompts}: row {missing[0] + 1} has no 'answer' column, which the "
                             f"{reward.reward} reward needs; add answers or pass --reward module:function.")
        return pool, []
    pool = choose_prompts(train, seed)
    if not train.eval_prompts:
        return pool, []
    heldout = load_heldout(train.task, train.eval_prompts, seed, parse_task_args(train.task_args), {p.question for p in pool})
    return pool, heldout


# ---------------------------------------------------------------------------------------------
# Generation servers: the engine and the weight sync of `treepo train --engine server`
# ---------------------------------------------------------------------------------------------


def start_serving(engine_cfg: EngineConfig, sync_cfg: WeightSyncConfig, policy, tokenizer, out: Path, *, seed: int,
                  context: int, need: int, resuming: bool = False):
    """(server engine, weight sync) for a training run; `context` = the model's, `need` = the tokens a
    sequence of this run may hold (a launched server's slots get that many, at most the model's).

    With --launch_server the policy is written as a float GGUF and llama-server starts on it, so the
    first rollout already samples the policy's weights; the engine owns the server and stops it.
    """
    from ..engines.weight_sync.base import hold_sync_dir

    sync_dir = Path(sync_cfg.sync_dir).expanduser() if sync_cfg.sync_dir else Path(out) / "weight_sync"
    created = [p for p in (sync_dir, *sync_dir.parents) if not p.exists()]  # removed again if the start fails
    held = hold_sync_dir(sync_dir)  # two runs writing one folder would load each other's weights
    need = max(need, 64 + sync_cfg.probe_tokens)  # the weight check's probe fits a slot too
    try:
        return _serve(engine_cfg, sync_cfg, policy, tokenizer, sync_dir, held, context=context, need=need,
                      seed=seed, resuming=resuming)
    except BaseException:
        held.close()
        if created:
            shutil.rmtree(created[-1], ignore_errors=True)  # the outermost folder this start made: nothing left
        raise


def _serve(engine_cfg, sync_cfg, policy, tokenizer, sync_dir: Path, held, *, context: int, need: int, seed: int,
           resuming: bool):
    from ..engines.loading import launch_server, server_engine
    from ..engines.weight_sync import build_weight_sync
    from ..engines.weight_sync.base import WeightMismatch

    launched = None
    if engine_cfg.launch_server:
        from ..engines.weight_sync.gguf import write_gguf

        gguf = sync_dir / "step-000000.gguf"
        write_gguf(policy, tokenizer, gguf, sync_cfg.gguf_type, timeout=sync_cfg.sync_timeout)
        launched = launch_server(engine_cfg, gguf, min(need, context), log_path=sync_dir / "llama-server.log",
                                 startup_timeout=sync_cfg.sync_timeout)
    engine = server_engine(engine_cfg, tokenizer, context, seed=seed, server=launched)
    sync = None
    try:
        sync = build_weight_sync(sync_cfg, engine, policy, tokenizer, sync_dir=sync_dir, launched=launched)
        sync.held = held
        # A server started elsewhere may run other weights: push unless it serves the policy's (a resumed run
        # pushes the checkpoint's weights when it restores them).
        if launched is None and not resuming:
            try:
                sync.verify(policy, 0)
            except WeightMismatch:
                sync.push(policy, 0)
    except BaseException:
        try:
            if sync is not None:
                sync.close()
        finally:
            engine.close()
        raise
    log.info("weight sync: %s to %s (%s)", sync.name, ", ".join(sync.urls()), sync_dir)
    return engine, sync
