"""A run folder's state across restarts: may this run start or resume here, and its random streams.

`check_run_folder` decides, before the model loads, whether `--out` starts a new run or resumes one
(and refuses a resume whose settings differ from the checkpoint's, but for those in RESUMABLE);
`rng_state` / `set_rng_state` are the random streams a checkpoint saves and restores.
`checkpoint.py` writes and reads the folders themselves.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from rich.console import Console

from ..errors import ConfigError, InputError
from . import checkpoint

log = logging.getLogger(__name__)

# Settings a resumed run may change; every other one must match the checkpoint's.
RESUMABLE = {"steps", "eval_prompts", "eval_samples", "eval_every", "eval_mode", "checkpoint_every", "keep_checkpoints",
             "resume", "tensorboard", "out", "threads", "device",
             "packed_attention",  # how the same log-probs are computed
             # where and how patiently the servers are reached, and how the weight sync is checked
             "server_url", "server_timeout", "server_retries", "server_concurrency", "server_routing",
             "server_parallel", "server_threads", "sync_dir", "sync_tolerance", "sync_timeout", "probe_tokens",
             "nccl_master_address", "nccl_master_port", "server_kind", "weight_sync", "nccl_server_ranks", "gguf_type"}


def check_run_folder(out: Path, resume, configs: dict, console: Console) -> Optional[Path]:
    """The checkpoint to resume from (None = start at step 0), or an error naming the fix."""
    latest = checkpoint.latest_checkpoint(out)
    if latest is None:
        started = (out / "metrics.jsonl").is_file()  # a run that stopped before its first checkpoint
        if resume is True:
            where = f"out={str(out)!r}"
            what = (f"{where} does not exist" if not out.exists()
                    else f"{where} holds a run that stopped before its first checkpoint" if started
                    else f"{where} has no checkpoint")
            raise InputError(f"--resume: {what}, so there is nothing to resume: check --out, or pass "
                             "--resume auto to start a new run when there is no checkpoint.")
        if resume == "auto":
            console.print(f"--resume auto: no checkpoint in {out}: starting a new run at step 0")
        elif started:
            log.warning("%s has no complete checkpoint: starting the run again from step 0", out)
        return None
    if not resume:
        raise InputError(f"out={str(out)!r} already holds a training run: pass --resume to continue it, "
                         "or choose another --out.")
    saved = json.loads((latest / "trainer.json").read_text()).get("config", {})
    changed = [f"{section}.{k}" for section, now in configs.items()
               for k, v in now.items()  # a setting newer than the checkpoint is not compared
               if k in saved.get(section, {}) and k not in RESUMABLE and saved[section][k] != v]
    if changed:
        raise ConfigError(f"resume: {', '.join(changed)} differ from the run in {out}; a resumed run must "
                          "keep its settings (only steps, evaluation, checkpoint and logging settings may change).")
    return latest


def rng_state(sampler, engine) -> dict:
    """Every random stream a training step draws from, for a checkpoint."""
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "sampler": sampler.rng.getstate(),
        "engine": engine.rng_state(),
        # the answer lengths the adaptive shape chooses from, so a resumed run grows the same trees
        "shape_history": sampler.shaper.history.state() if sampler.shaper is not None else None,
    }


def set_rng_state(rng: dict, sampler, engine) -> None:
    """Put back the streams `rng_state` saved."""
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    sampler.rng.setstate(rng["sampler"])
    engine.set_rng_state(rng["engine"])
    if sampler.shaper is not None and rng.get("shape_history") is not None:
        sampler.shaper.history.load(rng["shape_history"])
