"""RolloutConfig (the `treepo rollout` job's problems and output) and the problem source train and eval share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from .base import _help, _require


DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. Reason step by step, then give the final answer "
    "in the form \\boxed{ANSWER}."
)


@dataclass
class RolloutConfig:
    """The `treepo rollout` job: which prompts, how many at once, where results go."""

    DEFAULT_TASK: ClassVar[str] = "gsm_symbolic"  # used when neither task nor prompts is given
    DEFAULT_TASK_ARGS: ClassVar[Optional[str]] = None

    task: Optional[str] = field(
        default=None,
        metadata=_help("reasoning-gym task name (e.g. gsm_symbolic, chain_sum); default gsm_symbolic unless --prompts."),
    )
    task_args: Optional[str] = field(
        default=None,
        metadata=_help('JSON object of reasoning-gym task settings, e.g. \'{"min_terms": 2, "max_terms": 2}\'.'),
    )
    prompts: Optional[str] = field(
        default=None,
        metadata=_help("The problems: a JSONL file (one object per line with a 'prompt' string, optional 'answer'), "
                       "or as TRL users keep them, a Hugging Face dataset folder (save_to_disk) or a .parquet, "
                       ".json, .jsonl or .csv file, read with datasets (see --prompt-column, --answer-column)."),
    )
    prompt_column: str = field(
        default="prompt",
        metadata=_help("Column of --prompts holding the prompt: a string, or a conversation (a list of "
                       "{role, content} messages, rendered with the chat template)."),
    )
    answer_column: str = field(
        default="answer",
        metadata=_help("Column of --prompts holding the reference answer (optional unless changed); the other "
                       "columns reach a 'module:function' reward as keyword lists, as TRL passes them."),
    )
    num_prompts: int = field(default=4, metadata=_help("Prompts to roll out (the first N of the source)."))
    prompt_batch_size: int = field(
        default=8, metadata=_help("Prompts whose trees grow together; all their active paths share each engine step.")
    )
    system_prompt: str = field(
        default=DEFAULT_SYSTEM_PROMPT, metadata=_help("System message placed before each prompt by the chat template.")
    )
    out: str = field(default="runs/rollout", metadata=_help("Output folder for rollouts.jsonl, trees.jsonl, summary.json."))

    def __post_init__(self) -> None:
        _require(
            not (self.task and self.prompts),
            "both task and prompts are set: use --task NAME or --prompts FILE.jsonl, not both.",
        )
        _require(self.num_prompts >= 1, f"num_prompts={self.num_prompts}: must be >= 1.")
        for name in ("prompt_column", "answer_column"):
            _require(isinstance(getattr(self, name), str) and bool(getattr(self, name).strip()),
                     f"{name}={getattr(self, name)!r}: give a column name, e.g. --{name.replace('_', '-')} question.")
        _require(self.prompt_column != self.answer_column,
                 f"prompt_column and answer_column are both {self.prompt_column!r}: name two different columns.")
        _require(bool(self.prompts) or (self.prompt_column, self.answer_column) == ("prompt", "answer"),
                 "prompt_column / answer_column are set but there is no --prompts dataset: add --prompts PATH.")
        _require(self.prompt_batch_size >= 1, f"prompt_batch_size={self.prompt_batch_size}: must be >= 1.")
        if not self.prompts and not self.task:
            self.task = self.DEFAULT_TASK
            if self.task_args is None:
                self.task_args = self.DEFAULT_TASK_ARGS


# The default training problems: easy enough that SmolLM2-135M starts above zero and can improve.
EASY_TASK = "letter_counting"
EASY_TASK_ARGS = '{"min_words": 1, "max_words": 3}'

DEFAULT_TRAIN_SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer briefly: give the final answer as a number in the form \\boxed{ANSWER}."
)


DEFAULT_TRAIN_POOL = 2000


@dataclass
class EasyTaskConfig(RolloutConfig):
    """The problem source train and eval share: by default the easy task, with the brief-answer prompt."""

    DEFAULT_TASK: ClassVar[str] = EASY_TASK
    DEFAULT_TASK_ARGS: ClassVar[Optional[str]] = EASY_TASK_ARGS

    task: Optional[str] = field(
        default=None,
        metadata=_help(f"reasoning-gym task (unless --prompts); default {EASY_TASK} with {EASY_TASK_ARGS}."),
    )
    system_prompt: str = field(
        default=DEFAULT_TRAIN_SYSTEM_PROMPT, metadata=_help("System message placed before each prompt.")
    )
