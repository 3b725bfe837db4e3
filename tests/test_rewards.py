"""Rewards: answer extraction, the built-in verifiers, custom functions, and every failure path."""

from __future__ import annotations

import itertools
import logging
import math
import signal
import sys
import textwrap
import threading
import time
from collections import Counter

import pytest

from treepo.errors import ConfigError, InputError
from treepo.answers import extract_answer
from treepo.rewards.scorers import RewardOutcome, build_reward

# ---------------------------------------------------------------------------------------------
# extract_answer


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so 3 + 4 = 7, hence \\boxed{12} (not 99)", "12"),  # a box wins over later numbers
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("first \\boxed{1}, finally \\boxed{2}", "2"),
        ("\\boxed{5} and an unclosed \\boxed{6", "5"),
        ("\\boxed{ } then 8", "8"),  # an empty box is no box
        ("3 apples and 4 pears make 7 fruits.", "7"),  # the last number, not a trailing full stop
        ("the total is -42", "-42"),
        ("x = -3.25 exactly", "-3.25"),
        ("about 1,234,567 people", "1234567"),
        ("pages 10-12", "12"),  # a hyphen between numbers is no minus sign
        ("it costs .5 dollars", ".5"),
        ("no digits at all", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# ---------------------------------------------------------------------------------------------
# math_verify


def _score(reward, completions, answers, entries=None) -> RewardOutcome:
    n = len(completions)
    columns = {"answer": list(answers), "entry": list(entries) if entries is not None else [{}] * n}
    return reward(["question"] * n, list(completions), columns)


def test_math_verify_scores_equivalent_forms_correct():
    reward = build_reward("math_verify")
    completions = [
        "\\boxed{1/2}", "\\boxed{\\frac{1}{2}}", "so it is 0.5", "\\boxed{0.50}", "\\boxed{2/3}", "I do not know",
    ]
    outcome = _score(reward, completions, ["0.5"] * 6)
    assert reward.name == "math_verify"
    assert outcome.rewards == [1.0, 1.0, 1.0, 1.0, -1.0, -1.0]
    assert outcome.correct == [True, True, True, True, False, False]
    assert outcome.answers == ["1/2", "\\frac{1}{2}", "0.5", "0.50", "2/3", None]
    assert outcome.failures == {}  # a wrong or missing answer is a verdict, not a failure


def test_math_verify_latex_reference():
    outcome = _score(build_reward("math_verify"), ["\\boxed{3\\sqrt{2}}", "\\boxed{3}"], ["3\\sqrt{2}"] * 2)
    assert outcome.rewards == [1.0, -1.0]


def test_auto_without_task_is_math_verify():
    assert build_reward("auto").name == "math_verify"
    assert build_reward().name == "math_verify"


def test_math_verify_missing_reference_names_the_row():
    reward = build_reward("math_verify")
    with pytest.raises(InputError, match=r"row 1 .*'answer' field"):
        _score(reward, ["\\boxed{1}", "\\boxed{2}"], ["1", None])
    with pytest.raises(InputError, match="row 0"):
        _score(reward, ["\\boxed{1}"], ["  "])


def _slow_verify(*args, **kwargs):
    time.sleep(3)
    return True


def test_math_verify_timeout_in_main_thread(monkeypatch, caplog):
    import math_verify

    monkeypatch.setattr(math_verify, "verify", _slow_verify)
    reward = build_reward("math_verify", timeout=0.2, failure_reward=-2.0)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        outcome = _score(reward, ["\\boxed{1}", "no answer here", "\\boxed{2}"], ["1", "1", "1"])
    assert time.monotonic() - started < 2.0  # each answer stopped after 0.2 s, not 3 s
    assert outcome.rewards == [-2.0, -1.0, -2.0]  # the answerless one never reaches the verifier
    assert outcome.correct == [False, False, False]
    assert outcome.failures == {"timeout": 2}
    assert caplog.text.count("failed (timeout)") == 2
    assert "cannot stop a thread" not in caplog.text  # the alarm interrupted it: no thread left behind
    assert "Timeout is disabled" not in caplog.text  # math_verify's own warning is filtered


def test_an_outer_alarm_survives(monkeypatch):
    import math_verify

    monkeypatch.setattr(math_verify, "verify", _slow_verify)
    fired = []

    def outer_handler(signum, frame):
        fired.append(signum)

    old_handler = signal.signal(signal.SIGALRM, outer_handler)
    old_timer = signal.setitimer(signal.ITIMER_REAL, 50)
    try:
        outcome = _score(build_reward("math_verify", timeout=0.2), ["\\boxed{1}"], ["1"])
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert signal.getsignal(signal.SIGALRM) is outer_handler
    finally:
        signal.setitimer(signal.ITIMER_REAL, *old_timer)
        signal.signal(signal.SIGALRM, old_handler)
    assert outcome.failures == {"timeout": 1}
    assert 48 < remaining < 50  # the outer timer goes on, less the time spent
    assert not fired


def test_math_verify_timeout_outside_the_main_thread(monkeypatch, caplog):
    import math_verify

    monkeypatch.setattr(math_verify, "verify", _slow_verify)
    reward = build_reward("math_verify", timeout=0.2)
    box = {}
    worker = threading.Thread(target=lambda: box.setdefault("outcome", _score(reward, ["\\boxed{1}"], ["1"])))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="treepo.rewards.scorers"):
        worker.start()
        worker.join(5)
    assert time.monotonic() - started < 2.0
    assert box["outcome"].failures == {"timeout": 1}
    assert box["outcome"].rewards == [-1.0]
    assert "cannot stop a thread" in caplog.text  # the abandoned thread is reported


def test_math_verify_scorer_error_counts_raised(monkeypatch):
    import math_verify

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(math_verify, "verify", broken)
    outcome = _score(build_reward("math_verify", failure_reward=-3.0), ["\\boxed{1}"], ["1"])
    assert outcome.rewards == [-3.0]
    assert outcome.failures == {"raised": 1}


# ---------------------------------------------------------------------------------------------
# reasoning_gym


@pytest.fixture(scope="module")
def chain_sum_entries():
    import reasoning_gym

    return list(reasoning_gym.create_dataset("chain_sum", size=3, seed=0, min_terms=2, max_terms=2))


def test_reasoning_gym_scores_real_entries(chain_sum_entries):
    entries = chain_sum_entries
    reward = build_reward("auto", task="chain_sum")
    assert reward.name == "reasoning_gym"
    right = [f"The result is \\boxed{{{e['answer']}}}" for e in entries]
    wrong = [f"\\boxed{{{int(e['answer']) + 1}}}" for e in entries]
    references = [e["answer"] for e in entries] * 2 + [None]
    outcome = _score(reward, right + wrong + ["no idea"], references, entries * 2 + entries[:1])
    assert outcome.rewards == [1.0] * 3 + [-1.0] * 3 + [-1.0]
    assert outcome.correct == [True] * 3 + [False] * 4
    assert outcome.answers[:3] == [e["answer"] for e in entries]
    assert outcome.failures == {}


def test_reasoning_gym_unboxed_number_fallback(chain_sum_entries):
    entry = chain_sum_entries[1]  # 4 - 1 = 3
    outcome = _score(build_reward("reasoning_gym"), ["4 minus 1 leaves 3"], [entry["answer"]], [entry])
    assert outcome.rewards == [1.0]


def test_reasoning_gym_partial_credit_is_kept(monkeypatch, chain_sum_entries):
    import reasoning_gym

    monkeypatch.setattr(reasoning_gym, "get_score_answer_fn", lambda name: lambda answer, entry: 0.75)
    outcome = _score(build_reward("reasoning_gym"), ["\\boxed{1}"], [None], chain_sum_entries[:1])
    assert outcome.rewards == [0.5]  # 2 * 0.75 - 1
    assert outcome.correct == [False]


@pytest.mark.parametrize("bad, kind", [(float("nan"), "nan"), ("1.0", "bad_output")])
def test_reasoning_gym_bad_scores_are_failures(monkeypatch, chain_sum_entries, bad, kind):
    import reasoning_gym

    monkeypatch.setattr(reasoning_gym, "get_score_answer_fn", lambda name: lambda answer, entry: bad)
    outcome = _score(build_reward("reasoning_gym", failure_reward=-5.0), ["\\boxed{1}"], [None], chain_sum_entries[:1])
    assert outcome.rewards == [-5.0]
    assert outcome.failures == {kind: 1}


def test_reasoning_gym_needs_a_dataset_name():
    with pytest.raises(InputError, match="row 0.*source_dataset"):
        _score(build_reward("reasoning_gym"), ["\\boxed{1}"], ["1"], [{"question": "q", "answer": "1"}])
    with pytest.raises(InputError, match="row 0.*no reasoning-gym entry"):
        _score(build_reward("reasoning_gym"), ["\\boxed{1}"], ["1"], [None])
    with pytest.raises(InputError, match="'no_such_task'"):
        unknown = {"answer": "1", "metadata": {"source_dataset": "no_such_task"}}
        _score(build_reward("reasoning_gym"), ["1"], ["1"], [unknown])


def test_reasoning_gym_task_fills_in_a_missing_source(chain_sum_entries):
    entry = {"question": "q", "answer": "3"}  # e.g. a JSONL row: no metadata
    reward = build_reward("reasoning_gym", task="chain_sum")
    outcome = _score(reward, ["\\boxed{3}", "\\boxed{4}"], ["3", "3"], [entry] * 2)
    assert outcome.rewards == [1.0, -1.0]


# ---------------------------------------------------------------------------------------------
# custom functions

USER_MODULE = textwrap.dedent(
    """
    import math
    import threading

    RELEASE = threading.Event()
    SEEN = {}

    def length(completions, **kwargs):
        SEEN.update(kwargs)
        return [1.0 if len(c) > 3 else -0.5 for c in completions]

    def positional(prompts, completions, answer, entry):
        return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]

    def raises(prompts, completions, **kwargs):
        raise ZeroDivisionError("user bug")

    def hangs(completions, **kwargs):
        RELEASE.wait(30)
        return [1.0] * len(completions)

    def some_nan(completions, **kwargs):
        return [1.0, math.nan, math.inf, None][: len(completions)]

    def too_short(completions, **kwargs):
        return [1.0]

    def not_a_list(completions, **kwargs):
        return 1.0

    def a_string(completions, **kwargs):
        return [1.0, "good"][: len(completions)]

    def tuple_of_ints(completions, **kwargs):
        return tuple(range(len(completions)))
    """
)
_module_names = (f"treepo_user_rewards_{i}" for i in itertools.count())


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A fresh user module on sys.path; yields its name."""
    name = next(_module_names)
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    module = sys.modules.pop(name, None)
    if module is not None:
        module.RELEASE.set()  # let any abandoned worker thread finish


def _columns(n: int) -> dict[str, list]:
    return {"answer": ["ok"] * n, "entry": [{"i": i} for i in range(n)]}


def test_custom_function_gets_columns_as_keywords(user_module):
    reward = build_reward(f"{user_module}:length")
    assert reward.name == f"{user_module}:length"
    outcome = reward(["p1", "p2"], ["long text 42", "no"], _columns(2))
    assert outcome.rewards == [1.0, -0.5]
    assert outcome.correct == [True, False]
    assert outcome.answers == ["42", None]
    assert outcome.failures == {}
    seen = sys.modules[user_module].SEEN
    assert seen == {"prompts": ["p1", "p2"], "answer": ["ok", "ok"], "entry": [{"i": 0}, {"i": 1}]}


def test_custom_function_with_named_parameters(user_module):
    outcome = build_reward(f"{user_module}:positional")(["p", "p"], ["ok", "no"], _columns(2))
    assert outcome.rewards == [1.0, 0.0]
    assert outcome.correct == [True, False]  # correct means reward > 0


def test_custom_tuple_of_ints_is_accepted(user_module):
    outcome = build_reward(f"{user_module}:tuple_of_ints")(["p"] * 3, ["a", "b", "c"], _columns(3))
    assert outcome.rewards == [0.0, 1.0, 2.0]
    assert all(isinstance(r, float) for r in outcome.rewards)


def test_custom_raising_fails_every_completion(user_module, caplog):
    reward = build_reward(f"{user_module}:raises", failure_reward=-2.0)
    with caplog.at_level(logging.WARNING, logger="treepo.rewards.scorers"):
        outcome = reward(["p"] * 3, ["a", "b", "c"], _columns(3))
    assert outcome.rewards == [-2.0] * 3
    assert outcome.correct == [False] * 3
    assert outcome.failures == {"raised": 3}
    [record] = caplog.records
    assert "failed (raised)" in record.message and user_module in record.message
    assert "ZeroDivisionError: user bug" in record.message


def test_custom_hanging_times_out_fast(user_module, caplog):
    reward = build_reward(f"{user_module}:hangs", timeout=0.1, failure_reward=-4.0)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="treepo.rewards.scorers"):
        outcome = reward(["p"] * 2, ["a", "b"], _columns(2))
        reward(["p"], ["a"], _columns(1))
    assert time.monotonic() - started < 2.0  # 0.2 s + 0.1 s of limits, not 30 s
    assert outcome.rewards == [-4.0, -4.0]
    assert outcome.failures == {"timeout": 2}
    assert caplog.text.count("cannot stop a thread") == 1  # said once


def test_custom_nan_inf_none_fail_only_those_completions(user_module):
    outcome = build_reward(f"{user_module}:some_nan", failure_reward=-3.0)(["p"] * 4, ["a", "b", "c", "d"], _columns(4))
    assert outcome.rewards == [1.0, -3.0, -3.0, -3.0]
    assert outcome.correct == [True, False, False, False]
    assert outcome.failures == {"nan": 3}


@pytest.mark.parametrize("function", ["too_short", "not_a_list", "a_string"])
def test_custom_bad_output_fails_every_completion(user_module, function):
    outcome = build_reward(f"{user_module}:{function}", failure_reward=-7.0)(["p", "p"], ["a", "b"], _columns(2))
    assert outcome.rewards == [-7.0, -7.0]
    assert outcome.failures == {"bad_output": 2}


def test_failure_log_is_rate_limited(user_module, caplog):
    reward = build_reward(f"{user_module}:raises")
    with caplog.at_level(logging.WARNING, logger="treepo.rewards.scorers"):
        for _ in range(120):
            outcome = reward(["p"], ["a"], _columns(1))
    assert outcome.failures == {"raised": 1}  # counters are per call
    failures = [r for r in caplog.records if "failed (raised)" in r.message]
    assert len(failures) == 6  # events 1-5 and 100
    assert "#100" in failures[-1].message


def test_empty_batch_does_not_call_the_function(user_module):
    outcome = build_reward(f"{user_module}:raises")([], [], {"answer": [], "entry": []})
    assert outcome == RewardOutcome([], [], [], Counter())


# ---------------------------------------------------------------------------------------------
# build_reward


def test_build_reward_rejects_bad_specs(tmp_path, monkeypatch):
    (tmp_path / "treepo_broken_reward_module.py").write_text("raise RuntimeError('bad import')\n")
    (tmp_path / "treepo_plain_reward_module.py").write_text("NOT_CALLABLE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="cannot import module 'treepo_no_such_module'"):
        build_reward("treepo_no_such_module:fn")
    with pytest.raises(ConfigError, match="no callable 'missing'"):
        build_reward("treepo_plain_reward_module:missing")
    with pytest.raises(ConfigError, match="no callable 'NOT_CALLABLE'"):
        build_reward("treepo_plain_reward_module:NOT_CALLABLE")
    with pytest.raises(ConfigError, match="RuntimeError: bad import"):
        build_reward("treepo_broken_reward_module:fn")
    for spec in ("mathverify", ":fn", "module:"):
        with pytest.raises(ConfigError, match="module:function"):
            build_reward(spec)


@pytest.mark.parametrize(
    "kwargs", [{"timeout": 0}, {"timeout": -1.0}, {"timeout": math.inf}, {"timeout": "5"}, {"failure_reward": math.nan}]
)
def test_build_reward_rejects_bad_numbers(kwargs):
    with pytest.raises(ConfigError):
        build_reward("math_verify", **kwargs)


def test_mismatched_columns_are_a_caller_bug():
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2"):
        build_reward("math_verify")(["p", "p"], ["a", "b"], {"answer": ["1"], "entry": [{}, {}]})
