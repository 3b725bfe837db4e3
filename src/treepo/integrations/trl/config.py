"""TreePOConfig: TRL's GRPOConfig plus TreePO's knobs (every one prefixed `treepo_`, with help).

The tree's width is TRL's `num_generations` (the group size); its response budget is TRL's
`max_completion_length`; its token sampling is TRL's `temperature`, `top_p` and `top_k`. What the
tree adds (depth, segment length, branching, the advantage estimator, ...) sits here, checked in
`__post_init__`, which also refuses the GRPOConfig settings the tree sampler cannot honour
(each message names the field and the fix) rather than sample in a way the user did not ask for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import get_args

from trl import GRPOConfig

from ...config import Estimator, SamplerConfig, Whitening
from ...errors import ConfigError

ON_UNSUPPORTED = ("error", "trl")
BACKENDS = ("hf", "auto", "lean")
DIVERGENCE_POLICIES = ("fixed_avg", "low_prob", "high_prob", "entropy")


# SamplerConfig's names as a TRL user sets them: the width is TRL's group size, the budget its completion length.
TRL_NAMES = {"width": "num_generations", "max_response_tokens": "max_completion_length", "seed": "seed"}
TREEPO_FIELDS = ("depth", "segment_len", "branching", "init_divergence_max", "init_divergence", "divergence_policy",
                 "budget", "shape", "fork_depth", "fallback_policy", "answer_policy")


def trl_words(message: str) -> str:
    """A SamplerConfig error in TreePOConfig's field names (`width` -> num_generations, `--depth` -> treepo_depth)."""
    names = {**TRL_NAMES, **{name: f"treepo_{name}" for name in TREEPO_FIELDS}}
    pattern = r"(?<![\w-])(?:--)?(" + "|".join(sorted(names, key=len, reverse=True)) + r")\b"
    message = re.sub(r"--([a-z_]+) (?=[\d']|(?!(?:or|and|to|below|above|raise|lower)\b)[a-z])", r"\1=", message)  # a flag and its value: a keyword argument
    return re.sub(pattern, lambda m: names[m.group(1)], message)


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class TreePOConfig(GRPOConfig):
    """GRPOConfig with TreePO's tree sampler and tree advantages. Width = `num_generations`."""

    treepo_width: int | None = field(
        default=None,
        metadata=_help("Leaves per tree; must equal num_generations (TRL hands each prompt exactly that many "
                       "completions). None = num_generations."),
    )
    treepo_depth: int = field(default=4, metadata=_help("Most segments on one path (the tree's depth d)."))
    treepo_segment_len: int | None = field(
        default=None,
        metadata=_help("New tokens per segment; None = ceil(max_completion_length / treepo_depth), so a path "
                       "can reach max_completion_length."),
    )
    treepo_branching: int = field(default=2, metadata=_help("Children a node gets when it forks (b)."))
    treepo_init_divergence: int = field(
        default=0, metadata=_help("Root fan-out (the low end when treepo_init_divergence_max is set); 0 = branching, "
                                  "or chosen by treepo_shape='adaptive' (set treepo_shape='fixed' to give it).")
    )
    treepo_init_divergence_max: int = field(
        default=0,
        metadata=_help("Root fan-out drawn from [treepo_init_divergence, this]; -1 = up to 8 (at most the width), "
                       "0 = a fixed fan-out of treepo_init_divergence (treepo_shape='fixed' only)."),
    )
    treepo_divergence_policy: str = field(
        default="fixed_avg",
        metadata=_help("How a step's children are split over active paths: fixed_avg, low_prob, high_prob, entropy.",
                       choices=DIVERGENCE_POLICIES),
    )
    treepo_budget: str = field(
        default="particles",
        metadata=_help("How the num_generations are spent: 'particles' (a fork splits a path's particles, a path "
                       "that ends keeps them: its completion is repeated that many times, so TRL gets exact draws "
                       "and the tree never decodes more than independent sampling), 'transfer' (the paper's: a "
                       "finished path's forks go to the survivors) or 'branch' (new branches cut from finished "
                       "paths).", choices=("particles", "transfer", "branch")),
    )
    treepo_shape: str = field(
        default="adaptive",
        metadata=_help("'adaptive': segment length, root fan-out and fork depth chosen each step from the answer "
                       "lengths of the last steps (max_completion_length stays the budget; the first step samples "
                       "independently); 'fixed': treepo_depth x treepo_segment_len and the fan-out as given.",
                       choices=("adaptive", "fixed")),
    )
    treepo_fallback_policy: str = field(
        default="finished",
        metadata=_help("Which finished paths are reopened when a tree runs out of active paths: finished, any, root.",
                       choices=("finished", "any", "root")),
    )
    treepo_answer_policy: str = field(
        default="boxed_and_eos",
        metadata=_help("When a path counts as answered: boxed_and_eos (a \\boxed{} and EOS), boxed_as_eos "
                       "(the box alone ends it), none (only EOS / the budget end a path).",
                       choices=("boxed_and_eos", "boxed_as_eos", "none")),
    )
    treepo_advantage: str = field(
        default="unbiased",
        metadata=_help("Tree advantage estimator replacing TRL's group advantage: unbiased, average, "
                       "size_weighted, segment (per segment, so per token), grpo.", choices=get_args(Estimator)),
    )
    treepo_whiten: str | None = field(
        default=None,
        metadata=_help("Normalisation of the generation batch's advantages (replaces scale_rewards): token, "
                       "scale, group, none; None = scale (none for grpo), as treepo train."),
    )
    treepo_backend: str = field(
        default="hf",
        metadata=_help("Embedded engine forward: 'hf' (the model's own forward on the trainer's weights, no copy), "
                       "'auto'/'lean' (a fused Llama-family decoder: faster on CPU, but holds fused copies of "
                       "the linear weights, re-fused after every optimizer step; never used for PEFT models).",
                       choices=BACKENDS),
    )
    treepo_on_unsupported: str = field(
        default="error",
        metadata=_help("When the embedded engine cannot run the model: 'error' (refuse, with the reason) or "
                       "'trl' (log the reason and train with TRL's own generation and GRPO advantages).",
                       choices=ON_UNSUPPORTED),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.treepo_check()

    # -- checks ----------------------------------------------------------------------------
    def treepo_check(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"TreePOConfig: {message}")

        if self.treepo_width is None:
            self.treepo_width = self.num_generations
        need(self.treepo_width == self.num_generations,
             f"treepo_width={self.treepo_width} differs from num_generations={self.num_generations}: the tree's "
             f"leaves are TRL's completions, so set num_generations={self.treepo_width} or drop treepo_width.")
        need(self.max_completion_length is not None and self.max_completion_length >= 1,
             f"max_completion_length={self.max_completion_length}: set it (>= 1); it is the tree's response budget.")
        need(self.treepo_depth >= 1, f"treepo_depth={self.treepo_depth}: must be >= 1.")
        if self.treepo_segment_len is None:
            self.treepo_segment_len = -(-self.max_completion_length // self.treepo_depth)
        need(self.treepo_segment_len >= 1, f"treepo_segment_len={self.treepo_segment_len}: must be >= 1 (or None).")
        need(self.treepo_advantage in get_args(Estimator),
             f"treepo_advantage={self.treepo_advantage!r}: use one of {', '.join(get_args(Estimator))}.")
        need(self.treepo_whiten is None or self.treepo_whiten in get_args(Whitening),
             f"treepo_whiten={self.treepo_whiten!r}: use one of {', '.join(get_args(Whitening))}, or None.")
        need(self.treepo_backend in BACKENDS, f"treepo_backend={self.treepo_backend!r}: use one of {', '.join(BACKENDS)}.")
        need(self.treepo_on_unsupported in ON_UNSUPPORTED,
             f"treepo_on_unsupported={self.treepo_on_unsupported!r}: use 'error' or 'trl'.")
        # Generation settings the tree sampler cannot honour: refuse rather than sample another way.
        need(not (self.use_vllm and self.vllm_mode != "server"),
             f"use_vllm=True with vllm_mode={self.vllm_mode!r}: TreePO sends segment requests to TRL's vLLM server; "
             "use vllm_mode='server' (trl vllm-serve), or use_vllm=False for the embedded engine.")
        need(not (self.use_vllm and self.treepo_divergence_policy == "entropy"),
             "treepo_divergence_policy='entropy' needs sampling entropies, which the vLLM server does not return; "
             "use fixed_avg, low_prob or high_prob with use_vllm=True.")
        need(not self.use_transformers_continuous_batching,
             "use_transformers_continuous_batching=True: TreePO grows the trees with its own engine; set it False.")
        need(self.min_p is None, f"min_p={self.min_p}: TreePO's sampler has temperature, top_p and top_k only; "
             "set min_p=None.")
        need(self.repetition_penalty == 1.0, f"repetition_penalty={self.repetition_penalty}: TreePO's sampler does "
             "not apply one; set repetition_penalty=1.0 (treepo stops repeating paths itself).")
        need(not self.generation_kwargs, f"generation_kwargs={self.generation_kwargs!r}: TreePO's sampler does not "
             "read them; drop them (temperature, top_p, top_k and max_completion_length are honoured).")
        need(self.multi_objective_aggregation == "sum_then_normalize",
             f"multi_objective_aggregation={self.multi_objective_aggregation!r}: tree advantages need one reward "
             "per completion; use 'sum_then_normalize' (the weighted sum of the reward functions).")
        local = self.per_device_train_batch_size * self.steps_per_generation
        need(local % self.num_generations == 0,
             f"per_device_train_batch_size * steps_per_generation = {local} is not a multiple of "
             f"num_generations={self.num_generations}: each process must hold whole trees; make "
             "per_device_train_batch_size (or gradient_accumulation_steps) a multiple of num_generations / its divisor.")
        need(self.treepo_branching <= self.num_generations,
             f"treepo_branching={self.treepo_branching} exceeds num_generations={self.num_generations}: a fork cannot "
             f"make more children than the tree has completions; lower treepo_branching to <= {self.num_generations} "
             f"or raise num_generations to >= {self.treepo_branching}.")
        try:
            self.treepo_sampler_config()
        except ConfigError as e:
            raise ValueError(f"TreePOConfig: {trl_words(str(e))}") from e

    # -- what treepo needs -----------------------------------------------------------------
    @property
    def treepo_whitening(self) -> str:
        """The normalisation in force: treepo_whiten, else 'scale' ('none' for grpo), as `treepo train`."""
        if self.treepo_whiten is not None:
            return self.treepo_whiten
        return "none" if self.treepo_advantage == "grpo" else "scale"

    def treepo_sampler_config(self, width: int | None = None) -> SamplerConfig:
        """treepo's SamplerConfig for trees of `width` leaves (default num_generations)."""
        return SamplerConfig(
            width=width or self.num_generations,
            depth=self.treepo_depth,
            segment_len=self.treepo_segment_len,
            branching=self.treepo_branching,
            init_divergence=self.treepo_init_divergence,
            init_divergence_max=self.treepo_init_divergence_max,
            divergence_policy=self.treepo_divergence_policy,
            budget=self.treepo_budget,
            shape=self.treepo_shape,
            fallback_policy=self.treepo_fallback_policy,
            answer_policy=self.treepo_answer_policy,
            max_response_tokens=self.max_completion_length,
            seed=self.seed,
        )
