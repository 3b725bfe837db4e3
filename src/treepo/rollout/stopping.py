"""When a path stops: the answer predicate, the repetition detector, and the rule order.

`classify` applies the stopping rules to a freshly generated segment, first match wins:
answer -> (the environment's check_finished) -> eos / stop -> max_tokens -> depth, with
repetition first or last. It is a pure function of
the segment, the whole response text and the config, so the sampler stays testable without a
model.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Optional

from ..answers import has_boxed_answer
from ..config import SamplerConfig
from ..plugins import load_callable

AnswerPredicate = Callable[[str], bool]

def is_repetitive(text: str, window: int, count: int) -> bool:
    """True when some `window`-character substring occurs at least `count` times (overlaps count)."""
    if count < 2 or len(text) < window + count - 1:
        return False
    seen = Counter(text[i : i + window] for i in range(len(text) - window + 1))
    return max(seen.values()) >= count


def answer_predicate(cfg: SamplerConfig) -> Optional[AnswerPredicate]:
    """The configured predicate, or None when answers never end a path."""
    if cfg.answer_policy == "none":
        return None
    if cfg.answer_predicate:
        return load_callable(cfg.answer_predicate, "answer_predicate")
    return has_boxed_answer


def classify(
    cfg: SamplerConfig,
    *,
    segment_text: str,
    response_text: str,
    hit_eos: bool,
    response_len: int,
    depth: int,
    predicate: Optional[AnswerPredicate],
    hit_stop: bool = False,
    env_check: Optional[Callable[[], Optional[str]]] = None,
) -> Optional[str]:
    """Finish reason for a path whose newest segment was just generated, or None if it goes on.

    `response_text` is what the answer rule reads: the current assistant turn (the whole response
    when there are no env turns). `depth` counts model segments; `response_len` every token after
    the prompt. With an environment, `env_check` (its `check_finished`) is asked after the answer
    rule, and the end of a turn (EOS or a stop string) no longer ends the path: the environment
    answers it (the sampler's job). In turn mode a turn that hit its token cap without ending ends
    the path ('max_tokens').
    """

    def repetition() -> Optional[str]:
        if cfg.rep_count and is_repetitive(segment_text, cfg.rep_window, cfg.rep_count):
            return "repetition"
        return None

    turn_ended = hit_eos or hit_stop
    if cfg.rep_priority == "first" and (reason := repetition()):
        return reason
    # The whole turn is searched, so a box split across segments is found.
    if predicate is not None and (turn_ended or cfg.answer_policy == "boxed_as_eos") and predicate(response_text):
        return "answer"
    if env_check is not None:
        if reason := env_check():
            return reason
    elif turn_ended:
        return "eos" if hit_eos else "stop"
    if cfg.segment_mode == "turn" and not turn_ended:
        return "max_tokens"  # the turn reached max_turn_tokens (or the response budget) unfinished
    # Only an explicit cap counts here; a full-length path at full depth ends by 'depth'.
    if cfg.max_response_tokens and response_len >= cfg.max_response_tokens:
        return "max_tokens"
    if depth >= cfg.depth:
        return "depth"
    if response_len >= cfg.response_budget:  # env turns used up the budget before the depth
        return "max_tokens"
    if cfg.rep_priority == "last" and (reason := repetition()):
        return reason
    return None
