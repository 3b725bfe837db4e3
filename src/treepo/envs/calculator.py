"""The calculator tool environment: the model writes <calc>EXPRESSION</calc>, the tool answers.

    treepo rollout --env calculator --segment_mode turn --max_turn_tokens 128 --depth 4

The closing tag is a stop string, so the model's turn ends right after a call; `next_turn` evaluates
the expression with `safe_eval.evaluate` (never Python's eval: a whitelist of arithmetic, bounded
sizes, a time limit) and replies with a tool message, "12*7 = 84", or for a refused expression
"error: ... " with what the calculator accepts, which the model sees and may react to. A turn that
ends without a call (EOS) is the model's final message: `check_finished` ends the path there with
'eos' (a boxed answer ends it earlier with 'answer', by the sampler's answer rule).
"""

from __future__ import annotations

import re
from typing import Optional

from .base import Environment, EnvTurn, PathView
from .safe_eval import Refused, evaluate, format_number

CALL = re.compile(r"<calc>(.*?)</calc>", re.S)


def last_call(text: str) -> Optional[str]:
    """The expression of the last complete <calc>...</calc> in the text, else None."""
    calls = CALL.findall(text)
    return calls[-1].strip() if calls else None


class CalculatorEnv(Environment):
    """A safe arithmetic tool behind <calc>...</calc>; see the module docstring."""

    stop_strings = ("</calc>",)
    instructions = (
        "You have a calculator. To use it, write <calc>EXPRESSION</calc>, for example <calc>12*(3+4)</calc>, "
        "and stop; the result comes back in a tool message. It knows + - * / // % ** and sqrt, exp, log, "
        "sin, cos, tan, abs, floor, ceil, round, min, max, factorial, pi, e."
    )

    def __init__(self, role: str = "tool", time_limit: float = 1.0, max_digits: int = 1000):
        if not isinstance(role, str) or not role:
            raise ValueError(f"role={role!r}: give the chat role of tool messages, e.g. 'tool'")
        if time_limit <= 0 or max_digits < 1:
            raise ValueError("time_limit must be > 0 seconds and max_digits >= 1")
        self.role, self.time_limit, self.max_digits = role, time_limit, max_digits

    def check_finished(self, path: PathView) -> Optional[str]:
        if path.turn_ended and last_call(path.text) is None:
            return "eos" if path.hit_eos else "stop"  # a final message: nothing for the tool to do
        return None

    def next_turn(self, path: PathView) -> Optional[EnvTurn]:
        expression = last_call(path.text)
        if expression is None:
            return None
        return EnvTurn(messages=[{"role": self.role, "content": self.answer(expression)}])

    def answer(self, expression: str) -> str:
        """The tool message for one expression: its value, or the refusal."""
        try:
            value = evaluate(expression, max_digits=self.max_digits, time_limit=self.time_limit)
        except Refused as e:
            return (f"error: {e}. The calculator takes arithmetic such as 12*(3+4), 2**10 or sqrt(2); "
                    "it does not run code.")
        return f"{expression} = {format_number(value)}"
