"""The "re-check your answer" follow-up loop of the ms-swift TreePO example, done right.

After each assistant turn without a boxed answer, a user message asks the model to re-check its
reasoning and answer; in the last allowed turn it asks for the final answer outright. A boxed
answer ends the path ('answer'); reaching the turn limit ends it ('max_turns').

    treepo rollout --env recheck --segment_mode turn --max_turn_tokens 128 --depth 4 --max_turns 3

What the ms-swift example got wrong, and how it is done here:
- its depth bound was `max_turns | 6` (a bitwise or: 4 | 6 == 6); the bound here is
  `max_turns or path.max_turns` (the run's `max_turns`, or `depth` when that is unset);
- its "last turn" state and turn count lived in mutable sample fields, wrong after a rollback
  (a regrown branch kept the old finish reason and counted rounds of the whole rollout). Here
  both hooks read only the path: the turn count is `path.assistant_turns`, and every finish
  reason belongs to the segment that ended.
"""

from __future__ import annotations

from typing import Optional

from ..answers import has_boxed_answer
from .base import Environment, EnvTurn, PathView

RECHECK = ("You have not given a final answer yet. Re-check your reasoning very carefully, "
           "then give the final answer in the form \\boxed{ANSWER}.")
LAST_TURN = "This is your last turn: give your final answer now, in the form \\boxed{ANSWER}."


class RecheckEnv(Environment):
    """Ask again until a boxed answer or the turn limit; see the module docstring."""

    def __init__(self, max_turns: Optional[int] = None, role: str = "user"):
        if max_turns is not None and (not isinstance(max_turns, int) or max_turns < 1):
            raise ValueError(f"max_turns={max_turns!r}: give an integer >= 1, or leave it unset")
        self.max_turns, self.role = max_turns, role

    def limit(self, path: PathView) -> int:
        return self.max_turns or path.max_turns

    def check_finished(self, path: PathView) -> Optional[str]:
        if not path.turn_ended:
            return None  # mid-turn (fixed-length segments): let the model go on
        if has_boxed_answer(path.text):
            return "answer"
        if path.assistant_turns >= self.limit(path):
            return "max_turns"
        return None

    def next_turn(self, path: PathView) -> Optional[EnvTurn]:
        last = path.assistant_turns + 1 >= self.limit(path)
        return EnvTurn(messages=[{"role": self.role, "content": LAST_TURN if last else RECHECK}])
