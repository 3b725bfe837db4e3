"""Reward functions with TRL's signature, for the trainer tests (they vary within a group on random text)."""

import time

from treepo.tiny import letter_share  # noqa: F401 - one home for the toy reward

BROKEN = False  # `switchable` raises while this is True (tests flip it with monkeypatch)


def constant(prompts, completions, **columns):
    return [0.5] * len(completions)


def raises(prompts, completions, **columns):
    raise RuntimeError("the grader is down")


def switchable(prompts, completions, **columns):
    if BROKEN:
        raise RuntimeError("the grader is down")
    return letter_share(prompts, completions, **columns)


def nan_on_odd(prompts, completions, **columns):
    """NaN for every other completion: a partial failure."""
    return [float("nan") if i % 2 else r for i, r in enumerate(letter_share(prompts, completions))]


def all_nan(prompts, completions, **columns):
    return [float("nan")] * len(completions)


def wrong_count(prompts, completions, **columns):
    return [1.0]


def slow(prompts, completions, **columns):
    time.sleep(0.5)  # longer than the tests' reward_timeout x completions
    return [1.0] * len(completions)


SEEN_COLUMNS: list[dict] = []  # what `record_columns` was called with, for the dataset tests


def record_columns(prompts, completions, **columns):
    """TRL's signature: keeps the keyword columns it was given; rewards the letter share."""
    SEEN_COLUMNS.append({k: list(v) if isinstance(v, list) else v for k, v in columns.items()})
    return letter_share(prompts, completions)
