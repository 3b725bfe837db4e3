"""Scoring trees: a reward for every leaf, and the length shaping applied to it.

- `score_trees`: one reward call for every leaf of a batch of trees (training and evaluation both);
- `overlong_penalty`: DAPO's soft penalty for responses near the length budget.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence

from ..engines.base import Engine
from ..prompts import Prompt
from ..tree import PromptTree
from .scorers import FailureTally, RewardFunction


def score_trees(
    trees: Sequence[PromptTree], prompts: Sequence[Prompt], reward_fn: RewardFunction, engine: Engine,
    tally: Optional[FailureTally] = None,
) -> tuple[list[dict], Counter]:
    """Score every leaf of every tree in one reward call; fills `tree.rewards`.

    `prompts[tree.prompt_index]` is each tree's problem. Returns, in the order of `trees`, each one's leaves'
    {"correct", "answers", "texts"} lists, and the failure counts of the call. A completion is the
    model's own text: with environment turns, its assistant turns joined by newlines (a tool's
    output is not the model's answer). `tally`, if given, also counts the call's samples and failures.
    """
    flat = [(t, leaf) for t in trees for leaf in t.leaves]
    texts = ["\n".join(engine.decode(ids) for ids in t.model_turn_ids(leaf)) for t, leaf in flat]
    questions = [prompts[t.prompt_index].question for t, _ in flat]
    columns = {
        "answer": [prompts[t.prompt_index].answer for t, _ in flat],
        "entry": [prompts[t.prompt_index].metadata for t, _ in flat],
    }
    # A dataset's other columns, as TRL passes them (only those every prompt of the call has).
    shared = set.intersection(*(set(prompts[t.prompt_index].columns) for t, _ in flat)) if flat else set()
    for key in sorted(shared - set(columns) - {"prompts", "completions"}):
        columns[key] = [prompts[t.prompt_index].columns[key] for t, _ in flat]
    outcome = reward_fn(questions, texts, columns)
    if tally is not None:
        tally.add(outcome)
    per_tree = [{"correct": [], "answers": [], "texts": []} for _ in trees]
    position = {id(t): k for k, t in enumerate(trees)}
    for i, ((tree, leaf), text) in enumerate(zip(flat, texts)):
        tree.rewards[leaf] = outcome.rewards[i]
        row = per_tree[position[id(tree)]]
        row["correct"].append(bool(outcome.correct[i]))
        row["answers"].append(outcome.answers[i])
        row["texts"].append(text)
    return per_tree, outcome.failures


def overlong_penalty(length: int, budget: int, buffer: int, factor: float) -> float:
    """DAPO's soft overlong penalty: 0 up to budget - buffer tokens, then falling linearly to
    -factor at the budget (and beyond)."""
    if buffer <= 0 or length <= budget - buffer:
        return 0.0
    return -factor * min(1.0, (length - (budget - buffer)) / buffer)
