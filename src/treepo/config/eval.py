"""EvalConfig: the `treepo eval` job (k samples per held-out problem, mean@k / pass@k / maj@k)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .base import _help, _require
from .rollout import DEFAULT_TRAIN_POOL, EasyTaskConfig


@dataclass
class EvalConfig(EasyTaskConfig):
    """The `treepo eval` job: k samples per held-out problem, mean@k / pass@k / maj@k."""

    num_prompts: int = field(default=32, metadata=_help("Problems to evaluate."))
    split: Literal["heldout", "train"] = field(
        default="heldout",
        metadata=_help("'heldout' = problems from a seed training never uses, minus any that training could draw; "
                       "'train' = the training pool."),
    )
    k: int = field(default=0, metadata=_help("k of mean@k / pass@k / maj@k; 0 = width (all samples)."))
    train_pool: int = field(
        default=DEFAULT_TRAIN_POOL,
        metadata=_help("Size of the training pool (treepo train's num_prompts) that the held-out split excludes."),
    )
    compare_modes: bool = field(
        default=False,
        metadata=_help("Also sample the same problems with the other --mode (same seed) and report both side by "
                       "side: accuracy, decoded tokens, wall time, trajectories/s, and the measured saving of "
                       "tree over independent sampling (eval.json 'compare')."),
    )
    max_failure_share: float = field(
        default=1.0,
        metadata=_help("Share of samples whose reward may fail (raised, timed out, NaN, wrong output) before the "
                       "evaluation stops with an error and writes nothing; 1 = stop only when every sample failed, "
                       "0 = stop at any failure. Fewer failures are counted in the table and eval.json."),
    )
    out: str = field(default="runs/eval", metadata=_help("Output folder for eval.json and samples.jsonl."))

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.k >= 0, f"k={self.k}: must be >= 0 (0 = width).")
        _require(0 <= self.max_failure_share <= 1,
                 f"max_failure_share={self.max_failure_share}: must be a share in [0, 1] (1 = only all failed).")
