"""Stop rules: the brace-balanced box, the repetition detector, and the rule order."""

from __future__ import annotations

import pytest

from treepo.config import SamplerConfig
from treepo.answers import has_boxed_answer, last_boxed
from treepo.rollout.stopping import classify, is_repetitive


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{3} and an open \\boxed{4", "3"),  # the last complete box counts
        ("\\boxed{a{b}c", None),
        ("\\fbox{7}", "7"),
        ("no box here", None),
        ("\\boxed{}", ""),
    ],
)
def test_last_boxed_is_brace_balanced(text, expected):
    assert last_boxed(text) == expected
    assert has_boxed_answer(text) == (expected is not None)


def test_repetition_counts_overlapping_windows():
    assert is_repetitive("ab" * 10, window=4, count=8)  # "abab" starts at 0, 2, ..., 16: 9 times
    assert not is_repetitive("ab" * 5, window=4, count=8)  # only 4 times
    assert not is_repetitive("the quick brown fox jumps over the lazy dog", window=3, count=3)
    assert is_repetitive("xyz xyz xyz ", window=4, count=3)
    assert not is_repetitive("aaaa", window=2, count=0)


def test_rule_order_answer_eos_length_depth_repetition():
    cfg = SamplerConfig(depth=2, max_response_tokens=10, rep_window=2, rep_count=3)
    args = dict(segment_text="ababab", response_text="\\boxed{1}", response_len=10, depth=2, predicate=has_boxed_answer)
    assert classify(cfg, hit_eos=True, **args) == "answer"
    assert classify(cfg, hit_eos=True, **{**args, "response_text": "1"}) == "eos"
    assert classify(cfg, hit_eos=False, **args) == "max_tokens"  # boxed_and_eos needs EOS for 'answer'
    assert classify(cfg, hit_eos=False, **{**args, "response_len": 9}) == "depth"
    assert classify(cfg, hit_eos=False, **{**args, "response_len": 9, "depth": 1}) == "repetition"
    first = SamplerConfig(depth=2, rep_window=2, rep_count=3, rep_priority="first")
    assert classify(first, hit_eos=True, **args) == "repetition"
    as_eos = SamplerConfig(depth=2, answer_policy="boxed_as_eos")
    assert classify(as_eos, hit_eos=False, **{**args, "depth": 1, "segment_text": "x"}) == "answer"
    assert classify(as_eos, hit_eos=False, **{**args, "depth": 1, "segment_text": "x", "predicate": None}) is None
