"""Checkpoints that are never half-written: everything goes into a temporary folder beside the
target, which is renamed into place only when complete; `latest` then names it.

    out/checkpoints/step-000010/
        model/            save_pretrained (safetensors) + tokenizer: loadable by `treepo eval --model`
        optimizer.pt      optimizer and scheduler state dicts
        rng.pt            torch / python / numpy RNG, the sampler's RNG, the engine's generator
        trainer.json      step, data position, metric rows written so far (written last)
    out/checkpoints/latest   the newest complete step folder's name

A kill during a save leaves only a `.step-*.tmp` folder (or a `.model.*.tmp` one beside `model/`),
which `latest_checkpoint` ignores and `remove_stale` deletes when the run starts again (`prune` too).
Folders and files get the modes the umask gives (`io.apply_umask`), not mkdtemp's private 0700 / 0600,
so a colleague can read a model trained on shared storage.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from .. import io
from ..errors import InputError

CHECKPOINTS = "checkpoints"


def step_dir(out: Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS / f"step-{step:06d}"


def save(
    out: Path, step: int, *, model, tokenizer, optimizer_state: dict, rng_state: dict, trainer_state: dict,
    keep: int,
) -> Path:
    """Write a complete checkpoint for `step` atomically; keep the newest `keep`."""
    root = Path(out) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    target = step_dir(out, step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=root))
    try:
        model.save_pretrained(tmp / "model", safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "model")
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(rng_state, tmp / "rng.pt")
        io.write_json(tmp / "trainer.json", trainer_state)  # last: its presence marks a complete folder
        io.apply_umask(tmp)
        _fsync_tree(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    io.write_text(root / "latest", target.name + "\n")
    prune(out, keep)
    return target


def save_model_dir(target: Path, model, tokenizer) -> Path:
    """save_pretrained into a temporary sibling folder, then swap it in: `target` is always one whole model."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        io.apply_umask(tmp)
        _fsync_tree(tmp)
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def latest_checkpoint(out: Path) -> Optional[Path]:
    """The newest complete checkpoint folder, or None."""
    root = Path(out) / CHECKPOINTS
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "trainer.json").is_file():
            return candidate
    complete = sorted(p for p in root.glob("step-*") if (p / "trainer.json").is_file()) if root.is_dir() else []
    return complete[-1] if complete else None


def remove_stale(out: Path) -> list[Path]:
    """Delete the temporary folders a killed save left in run folder `out`; return what was removed.

    Call it when a run (re)starts, before it writes: then no save of this run is under way.
    """
    out = Path(out)
    old = out / ".model.old"  # a kill between save_model_dir's two renames: the previous model, put back
    if old.is_dir() and not (out / "model").exists():
        os.replace(old, out / "model")
    stale = [*(out / CHECKPOINTS).glob(".step-*.tmp"), *out.glob(".model.*.tmp"), *out.glob(".model.old")]
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return stale


def prune(out: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and any leftover temporary folders."""
    root = Path(out) / CHECKPOINTS
    for tmp in root.glob(".step-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    complete = sorted(p for p in root.glob("step-*") if (p / "trainer.json").is_file())
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load(folder: Path) -> dict[str, Any]:
    """{'model_dir', 'optimizer', 'rng', 'trainer'} of a checkpoint folder."""
    folder = Path(folder)
    try:
        trainer = json.loads((folder / "trainer.json").read_text())
        optimizer = torch.load(folder / "optimizer.pt", weights_only=False)
        rng = torch.load(folder / "rng.pt", weights_only=False)
    except Exception as e:  # unpickling, truncated files, bad JSON: all mean a damaged folder
        raise InputError(f"checkpoint {folder} is unreadable ({type(e).__name__}: {e}); delete it to resume "
                         "from an older one.") from e
    for key in ("step", "data_position"):
        if key not in trainer:
            raise InputError(f"checkpoint {folder}/trainer.json has no {key!r}; delete it to resume from an older one.")
    return {"model_dir": folder / "model", "optimizer": optimizer, "rng": rng, "trainer": trainer}


def load_weights(model, model_dir: Path) -> None:
    """Copy saved weights into `model` in place (tied weights included)."""
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise InputError(f"checkpoint {model_dir} has no weights (*.safetensors); delete it and resume from another.")
    state: dict[str, torch.Tensor] = {}
    try:
        for f in files:
            state.update(load_file(f))
    except Exception as e:
        raise InputError(f"checkpoint {model_dir}: unreadable weights ({e}); delete it and resume from another.") from e
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [m for m in missing if m not in tied and not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise InputError(f"checkpoint {model_dir} does not match the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}): resume with the same --model.")
