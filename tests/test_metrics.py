"""Evaluation metrics against hand-computed values: pass@k, mean@k, maj@k, bootstrap, summaries."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from treepo.answers import normalize_answer
from treepo.eval.metrics import bootstrap_ci, maj_at_k, majority_answer, mean_at_k, pass_at_k, summarize_eval

# -- pass@k --------------------------------------------------------------------------------------


def test_pass_at_k_hand_value():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2) = 0.7


@pytest.mark.parametrize("n,k", [(1, 1), (4, 2), (10, 3), (16, 16)])
def test_pass_at_k_edges(n, k):
    assert pass_at_k(n, 0, k) == 0.0
    assert pass_at_k(n, n, k) == 1.0


@pytest.mark.parametrize("n,c", [(1, 1), (5, 2), (8, 3), (20, 19)])
def test_pass_at_1_is_fraction_correct(n, c):
    assert pass_at_k(n, c, 1) == pytest.approx(c / n)


def test_pass_at_k_matches_binomial_form():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_pass_at_k_stable_for_large_n():
    # C(1000, 500) overflows a float; the product form must not
    value = pass_at_k(1000, 1, 500)
    assert value == pytest.approx(0.5)


@pytest.mark.parametrize("n,c,k,word", [(4, 1, 5, "k=5"), (4, 1, 0, "k=0"), (4, 5, 1, "c=5"), (0, 0, 1, "n=0")])
def test_pass_at_k_rejects_bad_arguments(n, c, k, word):
    with pytest.raises(ValueError, match=word):
        pass_at_k(n, c, k)


def test_pass_at_k_error_names_the_fix():
    with pytest.raises(ValueError, match="lower k or draw at least k samples"):
        pass_at_k(3, 1, 4)


# -- mean@k, majority ----------------------------------------------------------------------------


def test_mean_at_k():
    assert mean_at_k([True, False, False, True]) == 0.5
    assert mean_at_k([False] * 3) == 0.0
    with pytest.raises(ValueError):
        mean_at_k([])


@pytest.mark.parametrize("raw,norm", [(" 12. ", "12"), ("x   y\n z", "x y z"), ("3.5", "3.5"), ("7 ..", "7"),
                                      ("", None), (" . ", None), (None, None)])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_majority_answer_counts_normalised_forms():
    assert majority_answer(["13", " 12. ", "12", None, None, None]) == "12"


def test_majority_answer_ties_go_to_first_occurrence():
    assert majority_answer(["b", "a", "a", "b"]) == "b"
    assert majority_answer([None, "a", "b"]) == "a"


def test_majority_answer_none_without_answers():
    assert majority_answer([]) is None
    assert majority_answer([None, "  ", None]) is None


def test_majority_answer_rng_breaks_ties_at_random():
    rng = np.random.default_rng(0)
    picks = {majority_answer(["a", "b", "c"], rng=rng) for _ in range(60)}
    assert picks == {"a", "b", "c"}
    assert majority_answer(["a", "b", "b"], rng=rng) == "b"  # no tie: the rng is not used


# -- maj@k ---------------------------------------------------------------------------------------


def test_maj_at_k_exact_when_k_equals_n():
    assert maj_at_k(["4", "5", "4.", None], [True, False, True, False], k=4) == 1.0
    assert maj_at_k(["5", "5", "4", None], [False, False, True, False], k=4) == 0.0
    assert maj_at_k([None, None], [False, False], k=2) == 0.0


def test_maj_at_k_exact_ignores_seed_and_samples():
    answers, correct = ["a", "b", "b", "a"], [True, False, False, True]
    values = {maj_at_k(answers, correct, k=4, samples=s, seed=seed) for s in (1, 50) for seed in range(5)}
    assert values == {1.0}  # tie a/b goes to "a" (first), which is correct


def test_maj_at_k_vote_correct_if_any_sample_with_that_answer_is():
    assert maj_at_k(["7", "7", "8"], [False, True, False], k=3) == 1.0


def test_maj_at_k_subset_estimate_matches_hand_enumeration():
    # subsets of 3 from a a b b b c: "a" wins with both a's (4 subsets) or with a+b+c, a tie that
    # goes to the earliest answer (2*3 = 6 subsets): 10 of C(6,3) = 20, so maj@3 = 0.5 exactly
    answers = ["a", "a", "b", "b", "b", "c"]
    correct = [True, True, False, False, False, False]
    assert maj_at_k(answers, correct, k=3, samples=4000, seed=1) == pytest.approx(0.5, abs=0.03)


def test_maj_at_1_is_fraction_correct_among_samples():
    answers = ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10"]
    correct = [True] * 3 + [False] * 7
    assert maj_at_k(answers, correct, k=1, samples=4000, seed=2) == pytest.approx(0.3, abs=0.03)


def test_maj_at_k_deterministic_for_a_seed():
    answers = ["a", "b", "a", "c", "b", "b", "a", None]
    correct = [a == "a" for a in answers]
    first = maj_at_k(answers, correct, k=3, samples=50, seed=7)
    assert maj_at_k(answers, correct, k=3, samples=50, seed=7) == first
    assert 0.0 < first < 1.0


def test_maj_at_k_errors():
    with pytest.raises(ValueError, match="k=3"):
        maj_at_k(["a", "b"], [True, False], k=3)
    with pytest.raises(ValueError, match="2 answers but 3"):
        maj_at_k(["a", "b"], [True, False, True], k=1)


# -- bootstrap -----------------------------------------------------------------------------------


def test_bootstrap_ci_deterministic_and_ordered():
    values = [0.0, 1.0, 1.0, 0.25, 0.5, 0.0, 1.0, 0.75]
    first = bootstrap_ci(values, samples=500, seed=3)
    assert bootstrap_ci(values, samples=500, seed=3) == first
    mean, low, high = first
    assert mean == pytest.approx(np.mean(values))
    assert low <= mean <= high
    assert low < high
    assert bootstrap_ci(values, samples=500, seed=4) != first


def test_bootstrap_ci_level_widens_interval():
    values = np.random.default_rng(0).random(30)
    _, low50, high50 = bootstrap_ci(values, level=0.5)
    _, low99, high99 = bootstrap_ci(values, level=0.99)
    assert low99 < low50 < high50 < high99


def test_bootstrap_ci_constant_values():
    assert bootstrap_ci([0.3] * 5) == pytest.approx((0.3, 0.3, 0.3))


@pytest.mark.parametrize("kwargs", [{"values": []}, {"values": [1.0], "level": 1.0}, {"values": [1.0], "samples": 0}])
def test_bootstrap_ci_errors(kwargs):
    with pytest.raises(ValueError):
        bootstrap_ci(**kwargs)


# -- summarize_eval ------------------------------------------------------------------------------


def hand_problems() -> list[dict]:
    return [
        # c=2; majority "1" (2 votes) is correct
        {"correct": [True, False, False, True], "answers": ["1", "2", "3", "1"], "decoded_tokens": 100,
         "wall_seconds": 1.0},
        # unsolved; majority "5" wrong
        {"correct": [False, False, False, False], "answers": ["5", "5", None, "6"], "decoded_tokens": 200,
         "wall_seconds": 2.0},
        # c=1; majority "9" wrong although "8" was right
        {"correct": [False, True, False, False], "answers": ["9", "8", "9.", None], "decoded_tokens": 300,
         "wall_seconds": 0.0},
    ]


def test_summarize_eval_hand_example_k_equals_n():
    s = summarize_eval(hand_problems(), k=4)
    assert set(s) == {"problems", "samples_per_problem", "k", "mean@4", "pass@4", "maj@4", "solved",
                      "decoded_tokens", "decoded_tokens_per_solved", "wall_seconds", "wall_seconds_per_solved"}
    assert (s["problems"], s["samples_per_problem"], s["k"]) == (3, 4, 4)
    assert s["mean@4"]["value"] == pytest.approx((0.5 + 0 + 0.25) / 3)
    assert s["pass@4"]["value"] == pytest.approx(2 / 3)
    assert s["maj@4"]["value"] == pytest.approx(1 / 3)
    assert s["solved"] == 2
    assert s["decoded_tokens"] == 600
    assert s["decoded_tokens_per_solved"] == pytest.approx(300)
    assert s["wall_seconds_per_solved"] == pytest.approx(1.5)
    for name in ("mean@4", "pass@4", "maj@4"):
        assert set(s[name]) == {"value", "low", "high"}
        assert s[name]["low"] <= s[name]["value"] <= s[name]["high"]
    json.dumps(s)  # plain JSON types only


def test_summarize_eval_pass_at_2():
    s = summarize_eval(hand_problems(), k=2)
    # per problem: 1 - C(2,2)/C(4,2) = 5/6, 0, 1 - C(3,2)/C(4,2) = 1/2
    assert s["pass@2"]["value"] == pytest.approx((5 / 6 + 0 + 0.5) / 3)
    assert "pass@4" not in s and "maj@2" in s and "mean@2" in s
    assert 0.0 <= s["maj@2"]["value"] <= 1.0


def test_summarize_eval_deterministic_for_seed():
    assert summarize_eval(hand_problems(), k=2, seed=5) == summarize_eval(hand_problems(), k=2, seed=5)


def test_summarize_eval_no_solves():
    rows = [{"correct": [False, False], "answers": ["1", None], "decoded_tokens": 10, "wall_seconds": 0.0}]
    s = summarize_eval(rows, k=1)
    assert s["solved"] == 0
    assert s["decoded_tokens_per_solved"] is None and s["wall_seconds_per_solved"] is None


def test_summarize_eval_errors():
    rows = hand_problems()
    with pytest.raises(ValueError, match="k=5"):
        summarize_eval(rows, k=5)
    with pytest.raises(ValueError, match="unequal sample counts"):
        summarize_eval(rows + [{"correct": [True], "answers": ["1"], "decoded_tokens": 1, "wall_seconds": 0}], k=1)
    with pytest.raises(ValueError, match="problem 1"):
        summarize_eval([rows[0], {**rows[1], "answers": ["5"]}], k=1)
    with pytest.raises(ValueError, match="lacks answers"):
        summarize_eval([{"correct": [True]}], k=1)
    with pytest.raises(ValueError, match="no problems"):
        summarize_eval([], k=1)
