"""TrainConfig: the `treepo train` job (data, optimisation, the TreePO loss, logging, checkpoints)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, get_args

from ..errors import ConfigError
from .base import _help, _require
from .rollout import DEFAULT_TRAIN_POOL, EasyTaskConfig
from .sampler import Estimator, Whitening


PackedAttention = Literal["auto", "flex", "blocks", "dense"]
DEFAULT_EVAL_PROMPTS = 32  # enough held-out problems (x width samples) to see a 10-point change


@dataclass
class TrainConfig(EasyTaskConfig):
    """The `treepo train` job: data, optimisation, TreePO loss, logging and checkpoints."""

    num_prompts: int = field(
        default=DEFAULT_TRAIN_POOL, metadata=_help("Training problems in the pool (cycled, reshuffled each epoch).")
    )
    out: str = field(default="runs/train", metadata=_help("Run folder: metrics, checkpoints, final model, plots."))
    steps: int = field(
        default=10, metadata=_help("Training steps: each rolls out prompts_per_step groups and updates the policy.")
    )
    prompts_per_step: int = field(default=4, metadata=_help("Prompt groups (of width trajectories) per step."))
    mini_batches: int = field(
        default=1, metadata=_help("PPO updates per step; the step's prompt groups are split evenly between them.")
    )
    ppo_epochs: int = field(default=1, metadata=_help("Passes over each step's trajectories [paper: 1]."))
    micro_batch_size: int = field(
        default=8, metadata=_help("Trajectories per forward/backward (gradient accumulation inside an update); "
                                   "with packing, whole prompt groups up to this many trajectories (at least one).")
    )
    packing: bool = field(
        default=True,
        metadata=_help("Tree-packed training: each micro-batch's trajectories run as one sequence of their unique "
                       "tokens with a tree attention mask, so shared prefixes are computed once (exactly equal "
                       "log-probs); models it cannot pack fall back to flat rows with a logged reason."),
    )
    packed_attention: PackedAttention = field(
        default="auto",
        metadata=_help("How packed rows attend: 'flex' (FlexAttention block mask, CUDA), 'blocks' (the same block "
                       "mask through treepo's block-sparse kernel, any device; memory grows with the tokens), "
                       "'dense' (an N x N mask; memory grows with their square), 'auto' (the first of these "
                       "that gives flat-equal log-probs on a probe tree; the run logs which one ran)."),
    )
    learning_rate: float = field(default=2e-5, metadata=_help("AdamW peak learning rate [paper: 1e-6 on 7B; small models need more]."))
    warmup_steps: int = field(default=2, metadata=_help("Linear learning-rate warm-up, in optimizer updates."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay."))
    grad_clip: float = field(default=1.0, metadata=_help("Max gradient norm; 0 = no clipping."))
    advantage: Estimator = field(
        default="unbiased",
        metadata=_help(
            "'unbiased' (leave-one-out segment values with leaf weights: an unbiased policy gradient from tree "
            "samples; RLOO on independent ones), 'average' (the paper's tree advantage, Eq. 5), 'size_weighted' "
            "(Eq. 6), 'segment' (per-segment subtree-mean differences), 'grpo' (group mean/std)."
        ),
    )
    whiten: Optional[str] = field(
        default=None,
        metadata=_help(
            "How the step's advantages are normalised: 'token' (minus the token mean, over the token std: it can "
            "give wrong answers a positive advantage), 'scale' (over the token std only: no sign changes), "
            "'group' (centre each prompt group, then scale), 'none'. Default: 'scale', or 'none' for grpo."
        ),
    )
    clip_low: float = field(default=0.2, metadata=_help("PPO clip below: ratio >= 1 - clip_low."))
    clip_high: float = field(default=0.28, metadata=_help("PPO clip above (clip-higher): ratio <= 1 + clip_high."))
    dual_clip: float = field(default=10.0, metadata=_help("Dual-clip bound c for negative advantages; <= 1 = off."))
    kl_coef: float = field(default=0.0, metadata=_help("k3 KL penalty to the frozen initial model; 0 = no reference."))
    entropy_coef: float = field(default=0.0, metadata=_help("Entropy bonus coefficient; 0 = off."))
    old_logprobs: Literal["recompute", "engine"] = field(
        default="recompute",
        metadata=_help(
            "Old log-probs for the PPO ratio: 'recompute' with the policy before the update, or 'engine' "
            "(the sampler's, valid when it runs the same weights)."
        ),
    )
    dynamic_sampling: bool = field(
        default=True, metadata=_help("Drop prompt groups whose rewards are all equal (no signal); resample to refill.")
    )
    max_resample_rounds: int = field(
        default=2, metadata=_help("Extra rollout rounds per step to refill dropped groups (bounded cost).")
    )
    overlong_buffer: int = field(
        default=0,
        metadata=_help("DAPO soft overlong penalty: the last N tokens of the response budget cost up to "
                       "overlong_factor reward, linearly; 0 = off."),
    )
    overlong_factor: float = field(default=1.0, metadata=_help("Largest overlong penalty (at the budget)."))
    eval_prompts: int = field(
        default=-1,
        metadata=_help(f"Held-out problems of the task (disjoint from training) evaluated before training and at the "
                       f"end, --eval_samples samples each, so a run shows what it learned; 0 = none; -1 = {DEFAULT_EVAL_PROMPTS} "
                       "with a reasoning-gym task, none with --prompts (a file has no held-out split)."),
    )
    eval_samples: int = field(
        default=4, metadata=_help("Independent samples per held-out problem: the k of mean@k, pass@k and maj@k "
                                  "(4 x 32 problems keeps the main job's two evaluations to about a minute each); "
                                  "0 = the training width."),
    )
    eval_every: int = field(default=0, metadata=_help("Also evaluate every N steps; 0 = only before and after."))
    eval_mode: Literal["independent", "tree"] = field(
        default="independent",
        metadata=_help("Sampling of the held-out evaluation: 'independent' (the policy's own answers, so runs with "
                       "any training sampler compare) or 'tree' (the training sampler's leaves)."),
    )
    checkpoint_every: int = field(default=5, metadata=_help("Write a checkpoint every N steps (and at the end); 0 = only at the end."))
    keep_checkpoints: int = field(default=2, metadata=_help("Newest checkpoints kept; older ones are deleted."))
    # A string on the command line (`--resume` alone = 'true'); __post_init__ makes it False, True or 'auto'.
    resume: str = field(
        default=False,
        metadata=_help("Continue the run in --out from its latest checkpoint: `--resume` alone fails when --out has "
                       "none (a mistyped --out is not a silent fresh start); `--resume auto` resumes when there is "
                       "one, else starts at step 0 and says so.", nargs="?", const="true", metavar="auto"),
    )
    tensorboard: bool = field(default=True, metadata=_help("Also log metrics for TensorBoard (out/tb)."))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.resume = _resume_value(self.resume)
        if isinstance(self.whiten, bool) or str(self.whiten).lower() in ("true", "false", "1", "0"):
            # the old on/off switch (API, YAML `whiten: true`, `--whiten false`): on meant token whitening
            self.whiten = "token" if str(self.whiten).lower() in ("true", "1") else "none"
        _require(self.whiten is None or self.whiten in get_args(Whitening),
                 f"whiten={self.whiten!r}: use one of {', '.join(get_args(Whitening))} (e.g. --whiten scale).")
        _require(self.advantage in get_args(Estimator),
                 f"advantage={self.advantage!r}: use one of {', '.join(get_args(Estimator))} (e.g. --advantage unbiased).")
        _require(self.packed_attention in get_args(PackedAttention),
                 f"packed_attention={self.packed_attention!r}: use one of {', '.join(get_args(PackedAttention))} "
                 "(e.g. --packed_attention auto).")
        _require(self.eval_mode in ("independent", "tree"),
                 f"eval_mode={self.eval_mode!r}: use independent or tree.")
        positive = ("steps", "prompts_per_step", "mini_batches", "ppo_epochs", "micro_batch_size")
        for name in positive:
            _require(getattr(self, name) >= 1, f"{name}={getattr(self, name)}: must be an integer >= 1.")
        _require(
            self.prompts_per_step % self.mini_batches == 0,
            f"prompts_per_step={self.prompts_per_step} is not divisible by mini_batches={self.mini_batches}: "
            f"each PPO update takes an equal share of the prompt groups; make prompts_per_step a multiple.",
        )
        _require(self.learning_rate > 0, f"learning_rate={self.learning_rate}: must be > 0.")
        if self.eval_prompts == -1:
            self.eval_prompts = 0 if self.prompts else DEFAULT_EVAL_PROMPTS
        for name in ("warmup_steps", "max_resample_rounds", "eval_prompts", "eval_samples", "eval_every", "checkpoint_every",
                     "overlong_buffer", "overlong_factor"):
            _require(getattr(self, name) >= 0, f"{name}={getattr(self, name)}: must be >= 0.")
        _require(self.keep_checkpoints >= 1, f"keep_checkpoints={self.keep_checkpoints}: must be >= 1.")
        _require(0 <= self.clip_low < 1, f"clip_low={self.clip_low}: must be in [0, 1).")
        _require(self.clip_high >= 0, f"clip_high={self.clip_high}: must be >= 0.")
        for name in ("grad_clip", "kl_coef", "entropy_coef", "weight_decay"):
            _require(getattr(self, name) >= 0, f"{name}={getattr(self, name)}: must be >= 0.")
        _require(
            self.num_prompts >= self.prompts_per_step,
            f"num_prompts={self.num_prompts} is smaller than prompts_per_step={self.prompts_per_step}: "
            "raise num_prompts (the training pool).",
        )

    @property
    def whitening(self) -> str:
        """The normalisation in force: `whiten`, or by default 'scale' ('none' for grpo, normalised per group)."""
        if self.whiten is not None:
            return self.whiten
        return "none" if self.advantage == "grpo" else "scale"


def _resume_value(value) -> bool | str:
    """TrainConfig.resume as False, True or 'auto' (from a bool, or the strings of flags and YAML files)."""
    if isinstance(value, bool) or value == "auto":
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "y", "t"):
        return True
    if text in ("false", "no", "0", "n", "f", "none", ""):
        return False
    if text == "auto":
        return "auto"
    raise ConfigError(f"resume={value!r}: use --resume (continue; an error if --out has no checkpoint), "
                      "--resume auto (continue if there is a checkpoint, else start), or leave it out.")
