"""Reward functions: score completions, and never let a scorer crash or stall the run.

`build_reward(spec)` returns a `RewardFunction`, a callable
`(prompts, completions, columns) -> RewardOutcome`. `columns` holds equal-length lists, at least
"answer" (reference strings, may be None) and "entry" (the reasoning-gym entry, or the JSONL row).
Three kinds:

- "math_verify": the completion's final answer (`treepo.answers.extract_answer`) is compared with the reference
  by the `math_verify` package: +1 when equivalent (`1/2` == `0.5` == `\\frac{1}{2}`), else -1.
- "reasoning_gym": the entry's own reasoning-gym scorer gives c in [0, 1]; the reward is 2c - 1,
  so the scale matches math_verify and partial credit survives. Correct means c >= 1.
- "module:function": a user function with TRL's reward signature, called as
  `fn(prompts=..., completions=..., **columns) -> list[float]` (keywords, as TRL does, so a
  `def fn(completions, **kwargs)` works too). Correct means reward > 0.
- "auto" is "reasoning_gym" when a task is set, else "math_verify".

Failures. A completion whose scoring fails scores `failure_reward` and is counted in
`RewardOutcome.failures` under one kind: 'raised' (the scorer raised), 'timeout' (it ran past the
limit), 'nan' (a NaN/inf/None reward) or 'bad_output' (not a list of numbers of the right length).
Each failure event is logged as one warning line; only the first 5 and every 100th are logged.
Input problems (a missing reference answer, an entry with no reasoning-gym dataset) are not
reward failures: they raise `InputError`, naming the row and the fix.

Time limits: see `treepo.rewards.timelimit`.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from ..answers import extract_answer
from ..errors import ConfigError, InputError
from ..plugins import load_callable
from .timelimit import CallResult, call_in_thread, call_with_timeout

log = logging.getLogger(__name__)

FAILURE_KINDS = ("raised", "timeout", "nan", "bad_output")
WRONG_REWARD = -1.0  # a wrong or missing answer: a verdict, not a failure
LOG_FIRST, LOG_EVERY = 5, 100  # failure events logged: the first 5, then every 100th


@dataclass
class RewardOutcome:
    """Per-completion results of one reward call."""

    rewards: list[float]  # a failed completion gets failure_reward
    correct: list[bool]  # builtins: judged fully correct; custom functions: reward > 0
    answers: list[Optional[str]]  # extracted final answers (for majority vote), None if none
    failures: Counter = field(default_factory=Counter)  # kind -> number of completions
    first_failure: Optional[str] = None  # "kind: detail" of the call's first failure event


# What to do about each kind of failure, for the error that stops a run.
FAILURE_FIXES = {
    "raised": "fix the error in the function",
    "timeout": "make it faster or raise --reward_timeout",
    "nan": "return finite numbers",
    "bad_output": "return a list of one number per completion",
}


@dataclass
class FailureTally:
    """Reward failures over several calls (a training step, an evaluation): counts by kind, the first one."""

    samples: int = 0
    counts: Counter = field(default_factory=Counter)
    first: Optional[str] = None

    def add(self, outcome: RewardOutcome) -> None:
        self.samples += len(outcome.rewards)
        self.counts.update(outcome.failures)
        if self.first is None and outcome.first_failure is not None:
            self.first = outcome.first_failure

    @property
    def failed(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        """'3 of 32 samples (raised 2, timeout 1)'."""
        kinds = ", ".join(f"{k} {self.counts[k]}" for k in FAILURE_KINDS if self.counts.get(k))
        return f"{self.failed} of {self.samples} samples" + (f" ({kinds})" if kinds else "")

    def error_text(self, name: str, where: str) -> str:
        """The start of the one-line error: the function, how many failed `where`, the first failure and the fix."""
        kind = self.first.split(":", 1)[0] if self.first else max(self.counts, key=self.counts.__getitem__, default="")
        return (f"reward {name!r} failed on {self.describe()} {where}; first failure: {self.first or kind}; "
                f"{FAILURE_FIXES.get(kind, 'fix the function')}")


def _describe(error: Optional[BaseException]) -> str:
    if error is None:
        return ""
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0][:200]}" if message else type(error).__name__


class RewardFunction:
    """A callable `(prompts, completions, columns) -> RewardOutcome` that never raises for a failure."""

    name: str

    def __init__(self, name: str, *, timeout: float, failure_reward: float):
        self.name = name
        self.timeout = timeout
        self.failure_reward = failure_reward
        self._failure_events = 0
        self._abandoned_logged = False
        self._call_first: Optional[str] = None  # the current call's first failure, for RewardOutcome.first_failure

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, timeout={self.timeout}, failure_reward={self.failure_reward})"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], columns: dict[str, list]) -> RewardOutcome:
        self._check_shapes(prompts, completions, columns)
        self._call_first: Optional[str] = None
        outcome = self._score_batch(list(prompts), list(completions), columns)
        outcome.first_failure = self._call_first
        return outcome

    def _score_batch(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> RewardOutcome:
        raise NotImplementedError

    @staticmethod
    def _check_shapes(prompts: Sequence[str], completions: Sequence[str], columns: dict[str, list]) -> None:
        # A mismatch here is a bug in the caller (treepo), not a reward failure.
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"reward: {len(prompts)} prompts for {n} completions")
        for key, values in columns.items():
            if key in ("prompts", "completions"):
                raise ValueError(f"reward: column {key!r} clashes with the reward function's own argument")
            if len(values) != n:
                raise ValueError(f"reward: column {key!r} has {len(values)} values for {n} completions")

    def _fail(self, outcome: RewardOutcome, index: int, kind: str) -> None:
        outcome.rewards[index] = self.failure_reward
        outcome.correct[index] = False
        outcome.failures[kind] += 1

    def _log_failure(self, kind: str, count: int, detail: str) -> None:
        """One warning per failure event (which may cover several completions), rate-limited."""
        if self._call_first is None:
            self._call_first = f"{kind}: {detail}"
        self._failure_events += 1
        event = self._failure_events
        if event > LOG_FIRST and event % LOG_EVERY:
            return
        plural = "s" if count != 1 else ""
        note = ""
        if event >= LOG_FIRST:
            note = f" (failure #{event}; after the first {LOG_FIRST} only every {LOG_EVERY}th is logged)"
        log.warning(
            "reward %r failed (%s): %s; %d completion%s scored %s%s",
            self.name, kind, detail, count, plural, self.failure_reward, note,
        )

    def _log_abandoned(self) -> None:
        if not self._abandoned_logged:
            self._abandoned_logged = True
            log.warning(
                "reward %r: a timed-out call keeps running in a background thread (Python cannot stop a "
                "thread); it is abandoned and its result ignored. Said once.", self.name,
            )


class _AnswerReward(RewardFunction):
    """A built-in scorer: extract each completion's answer and score it alone, time-limited."""

    def _prepare(self, prompts: list[str], columns: dict[str, list]) -> list[Any]:
        """Check every row before any scoring; return per-row context for `_score`. May raise InputError."""
        raise NotImplementedError

    def _score(self, answer: str, context: Any) -> Any:
        """Credit c in [0, 1] for one extracted answer."""
        raise NotImplementedError

    def _context_failure(self, context: Any) -> Optional[tuple[str, str]]:
        """(kind, detail) when a row cannot be scored at all (e.g. its reference failed to parse)."""
        return None

    def _score_batch(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> RewardOutcome:
        contexts = self._prepare(prompts, columns)
        n = len(completions)
        outcome = RewardOutcome([WRONG_REWARD] * n, [False] * n, [extract_answer(c) for c in completions])
        for i, answer in enumerate(outcome.answers):
            if answer is None:
                continue  # nothing to score: a wrong answer, not a failure
            if (unusable := self._context_failure(contexts[i])) is not None:
                kind, detail = unusable
                self._fail(outcome, i, kind)
                self._log_failure(kind, 1, f"row {i}: {detail}")
                continue
            # Defaults bind this row's values now: an abandoned thread may run the lambda late.
            score = lambda answer=answer, context=contexts[i]: self._score(answer, context)  # noqa: E731
            result = call_with_timeout(score, self.timeout, self.name)
            if result.status == "timeout":
                self._fail(outcome, i, "timeout")
                self._log_failure("timeout", 1, f"row {i}: scoring answer {answer[:80]!r} took over {self.timeout:g} s")
                if result.abandoned:
                    self._log_abandoned()
                continue
            if result.status == "raised":
                self._fail(outcome, i, "raised")
                self._log_failure("raised", 1, f"row {i}: {_describe(result.error)}")
                continue
            credit = result.value
            if isinstance(credit, bool) or not isinstance(credit, numbers.Real):
                self._fail(outcome, i, "bad_output")
                self._log_failure("bad_output", 1, f"row {i}: the scorer returned {credit!r}, not a number")
                continue
            if not math.isfinite(credit):
                self._fail(outcome, i, "nan")
                self._log_failure("nan", 1, f"row {i}: the scorer returned {credit!r}")
                continue
            credit = min(max(float(credit), 0.0), 1.0)
            outcome.rewards[i] = 2.0 * credit - 1.0
            outcome.correct[i] = credit >= 1.0
        return outcome


def _as_latex(text: str) -> str:
    """Text math_verify parses as one expression: boxed unless already in a LaTeX environment."""
    if any(marker in text for marker in ("$", "\\boxed", "\\(", "\\[")):
        return text
    return f"\\boxed{{{text}}}"


class _QuietTimeoutWarning(logging.Filter):
    """Drop math_verify's 'Timeout is disabled' warning: the limit is enforced here instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


_GOLD_CACHE_LIMIT = 100_000


class MathVerifyReward(_AnswerReward):
    """+1 when the extracted answer is mathematically equivalent to the reference, else -1."""

    def __init__(self, *, timeout: float, failure_reward: float):
        super().__init__("math_verify", timeout=timeout, failure_reward=failure_reward)
        import math_verify  # imported now so a broken install fails at build time

        for name in ("math_verify.parser", "math_verify.grader"):
            logger = logging.getLogger(name)
            if not any(isinstance(f, _QuietTimeoutWarning) for f in logger.filters):
                logger.addFilter(_QuietTimeoutWarning())
        self._math_verify = math_verify
        self._gold: dict[str, CallResult] = {}  # reference text -> its parse (or its failure), kept across calls

    def _prepare(self, prompts: list[str], columns: dict[str, list]) -> list[CallResult]:
        references = columns.get("answer") or [None] * len(prompts)
        for i, reference in enumerate(references):
            if reference is None or not str(reference).strip():
                raise InputError(
                    f"reward 'math_verify': row {i} has no reference answer (prompt {prompts[i][:60]!r}). "
                    "Give every prompt an 'answer' field, or set the reward to a 'module:function' that needs none."
                )
        return [self._parse_gold(str(reference)) for reference in references]

    def _parse_gold(self, reference: str) -> CallResult:
        """The reference parsed once (time-limited); a failed parse is remembered, not retried per completion."""
        if reference not in self._gold:
            if len(self._gold) >= _GOLD_CACHE_LIMIT:
                self._gold.clear()
            mv = self._math_verify
            self._gold[reference] = call_with_timeout(
                lambda: mv.parse(_as_latex(reference), parsing_timeout=None), self.timeout, self.name
            )
        return self._gold[reference]

    def _context_failure(self, gold: CallResult) -> Optional[tuple[str, str]]:
        if gold.status == "timeout":
            return "timeout", f"parsing the reference answer took over {self.timeout:g} s"
        if gold.status == "raised":
            return "raised", f"parsing the reference answer raised {_describe(gold.error)}"
        return None

    def _score(self, answer: str, gold: CallResult) -> float:
        mv = self._math_verify
        prediction = mv.parse(_as_latex(answer), parsing_timeout=None)
        return 1.0 if mv.verify(gold.value, prediction, timeout_seconds=None) else 0.0


class ReasoningGymReward(_AnswerReward):
    """2c - 1 from the entry's reasoning-gym scorer, c in [0, 1]."""

    def __init__(self, *, task: Optional[str], timeout: float, failure_reward: float):
        super().__init__("reasoning_gym", timeout=timeout, failure_reward=failure_reward)
        self.task = task
        self._scorers: dict[str, Callable[[Optional[str], dict], float]] = {}

    def _scorer(self, dataset: str, row: int) -> Callable[[Optional[str], dict], float]:
        if dataset not in self._scorers:
            import reasoning_gym

            try:
                self._scorers[dataset] = reasoning_gym.get_score_answer_fn(dataset)
            except Exception as e:
                raise InputError(
                    f"reward 'reasoning_gym': row {row} names dataset {dataset!r}, which reasoning-gym cannot "
                    f"score ({_describe(e)}). Use a reasoning-gym task name (see reasoning_gym.factory.DATASETS)."
                ) from e
        return self._scorers[dataset]

    def _prepare(self, prompts: list[str], columns: dict[str, list]) -> list[tuple[Callable, dict]]:
        entries = columns.get("entry") or [None] * len(prompts)
        references = columns.get("answer") or [None] * len(prompts)
        contexts = []
        for i, (entry, reference) in enumerate(zip(entries, references)):
            if not isinstance(entry, dict):
                raise InputError(
                    f"reward 'reasoning_gym': row {i} has no reasoning-gym entry (prompt {prompts[i][:60]!r}). "
                    "Use a reasoning-gym task, or the 'math_verify' reward for a prompts file."
                )
            meta = entry.get("metadata")
            dataset = (meta.get("source_dataset") if isinstance(meta, dict) else None) or self.task
            if not dataset:
                raise InputError(
                    f"reward 'reasoning_gym': row {i}'s entry has no metadata.source_dataset and no task is set. "
                    "Set the task, or use the 'math_verify' reward."
                )
            if "answer" not in entry and reference is not None:
                entry = {**entry, "answer": reference}  # scorers read the reference from the entry
            contexts.append((self._scorer(dataset, i), entry))
        return contexts

    def _score(self, answer: str, context: tuple[Callable, dict]) -> Any:
        scorer, entry = context
        return scorer(answer, entry)


class CustomReward(RewardFunction):
    """A user function `fn(prompts, completions, **columns) -> list[float]`, one time-limited call per batch."""

    def __init__(self, spec: str, fn: Callable[..., Any], *, timeout: float, failure_reward: float):
        super().__init__(spec, timeout=timeout, failure_reward=failure_reward)
        self.fn = fn

    def _score_batch(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> RewardOutcome:
        n = len(completions)
        outcome = RewardOutcome([WRONG_REWARD] * n, [False] * n, [extract_answer(c) for c in completions])
        if n == 0:
            return outcome
        # Copies: an abandoned call must not see (or change) lists the caller goes on using.
        kwargs = {key: list(values) for key, values in columns.items()}
        limit = self.timeout * n
        result = call_in_thread(
            lambda: self.fn(prompts=list(prompts), completions=list(completions), **kwargs), limit, self.name
        )
        if result.status == "timeout":
            self._fail_all(outcome, "timeout", f"no result within {limit:g} s ({self.timeout:g} s x {n} completions)")
            self._log_abandoned()
            return outcome
        if result.status == "raised":
            self._fail_all(outcome, "raised", _describe(result.error))
            return outcome
        rewards, problem = _reward_list(result.value, n)
        if rewards is None:
            self._fail_all(outcome, "bad_output", problem)
            return outcome
        bad = []
        for i, reward in enumerate(rewards):
            if reward is None or not math.isfinite(reward):
                self._fail(outcome, i, "nan")
                bad.append(i)
            else:
                outcome.rewards[i] = reward
                outcome.correct[i] = reward > 0
        if bad:
            shown = ", ".join(f"{i}: {rewards[i]}" for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
            self._log_failure("nan", len(bad), f"non-finite rewards ({shown})")
        return outcome

    def _fail_all(self, outcome: RewardOutcome, kind: str, detail: str) -> None:
        for i in range(len(outcome.rewards)):
            self._fail(outcome, i, kind)
        self._log_failure(kind, len(outcome.rewards), detail)


def _reward_list(value: Any, n: int) -> tuple[Optional[list[Optional[float]]], str]:
    """The rewards as floats (None where TRL's 'not applicable' None was given), or None and why not."""
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):  # numpy array, torch tensor
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        return None, f"returned {type(value).__name__}, expected a list of {n} numbers"
    if len(value) != n:
        return None, f"returned {len(value)} rewards for {n} completions"
    rewards: list[Optional[float]] = []
    for i, reward in enumerate(value):
        if reward is None:
            rewards.append(None)
        elif isinstance(reward, numbers.Real):
            rewards.append(float(reward))
        else:
            return None, f"reward {i} is {type(reward).__name__} {reward!r:.60}, not a number"
    return rewards, ""


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def build_reward(
    spec: str = "auto", *, task: Optional[str] = None, timeout: float = 5.0, failure_reward: float = -1.0
) -> RewardFunction:
    """The reward for `spec`: 'auto', 'math_verify', 'reasoning_gym' or 'module:function'.

    A custom function is imported now, so a bad name is a ConfigError before any model work.
    """
    if not _is_number(timeout) or not 0 < timeout < math.inf:
        raise ConfigError(f"reward_timeout={timeout!r}: must be a positive number of seconds, e.g. 5.")
    if not _is_number(failure_reward) or not math.isfinite(failure_reward):
        raise ConfigError(f"failure_reward={failure_reward!r}: must be a finite number, e.g. -1.")
    spec = (spec or "auto").strip()
    if spec == "auto":
        spec = "reasoning_gym" if task else "math_verify"
    if spec == "math_verify":
        return MathVerifyReward(timeout=float(timeout), failure_reward=float(failure_reward))
    if spec == "reasoning_gym":
        return ReasoningGymReward(task=task, timeout=float(timeout), failure_reward=float(failure_reward))
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name.strip() or not attr.strip():
        raise ConfigError(
            f"reward={spec!r}: expected 'auto', 'math_verify', 'reasoning_gym' or 'module:function' "
            "(a function fn(prompts, completions, **columns) -> list[float] on the Python path)."
        )
    fn = load_callable(spec, "reward")
    return CustomReward(spec, fn, timeout=float(timeout), failure_reward=float(failure_reward))
