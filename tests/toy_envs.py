"""Small environments for the tests, loadable by name ("toy_envs:Always") like a user's own."""

from __future__ import annotations

from fakes import encode
from treepo.envs import Environment, EnvTurn


class Always(Environment):
    """Replies "[ok]" (as token ids) to every turn; never finishes a path itself."""

    def check_finished(self, path):
        return None

    def next_turn(self, path):
        return EnvTurn(token_ids=encode(f"[ok{path.assistant_turns}]"))


class ToolMessage(Always):
    """Replies with a tool message (rendered by the tokenizer)."""

    def next_turn(self, path):
        return EnvTurn(messages=[{"role": "tool", "content": "42"}])


class Never(Always):
    """Ends every episode at the first turn end."""

    def next_turn(self, path):
        return None


class Raises(Always):
    def next_turn(self, path):
        raise RuntimeError("tool crashed")


class RaisesInCheck(Always):
    def check_finished(self, path):
        raise KeyError("state")


class Malformed(Always):
    """Returns a different kind of malformed reply per prompt."""

    def next_turn(self, path):
        return [
            ["not", "an", "EnvTurn"],
            EnvTurn(),
            EnvTurn(messages=[{"role": "tool"}]),
            EnvTurn(token_ids=[-5]),
            EnvTurn(token_ids=[]),
            EnvTurn(messages=[{"role": "tool", "content": "x"}], token_ids=[65]),
        ][path.prompt_index % 6]


class BadReason(Always):
    def check_finished(self, path):
        return 7


class Custom(Always):
    """Finishes a path with its own reason once the model said 'done'."""

    def check_finished(self, path):
        return "said_done" if "done" in path.text else None


class NoNextTurn:
    """Duck-typed, but lacks next_turn."""

    def check_finished(self, path):
        return None


class OnlyCheck(Environment):
    """Subclasses the base but does not define next_turn."""

    def check_finished(self, path):
        return None


class NeedsArg(Always):
    def __init__(self, size: int):
        self.size = size


not_a_class = 3
