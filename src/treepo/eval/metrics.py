"""Evaluation metrics over sampled answers: pass@k, mean@k, maj@k, bootstrap intervals.

Pure functions on plain Python values (numpy only), so an evaluation can be re-scored offline:

    summary = summarize_eval(problems, k=8)   # problems: one row per problem, n samples each
    summary["pass@8"]                         # {"value": ..., "low": ..., "high": ...}

- pass@k: the unbiased estimator 1 - C(n-c, k)/C(n, k) of Chen et al. (2021) for n samples of
  which c are correct, in its product form (no huge binomials);
- mean@k: the mean correctness of a problem's samples;
- maj@k: whether a majority vote over k samples picks a correct answer (exact over all n when
  k == n, else the mean over random size-k subsets);
- intervals: a percentile bootstrap over problems (problems are resampled, not samples).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Optional, Sequence

import numpy as np

from ..answers import normalize_answer
from ..errors import InputError

# -- per problem ---------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n is correct.

    `c` of the `n` samples are correct. Uses 1 - prod_{i=n-c+1}^{n} (1 - k/i), which equals
    1 - C(n-c, k)/C(n, k) and stays exact in floating point for large n.
    """
    if n < 1:
        raise InputError(f"pass@k needs at least one sample per problem (n={n}).")
    if not 0 <= c <= n:
        raise InputError(f"pass@k: correct count c={c} must lie between 0 and n={n}.")
    if not 1 <= k <= n:
        raise InputError(f"pass@k: k={k} must lie between 1 and the samples per problem n={n}; "
                         f"lower k or draw at least k samples per problem.")
    if n - c < k:  # every size-k subset contains a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_at_k(correct: Sequence[bool]) -> float:
    """The fraction of one problem's samples that are correct."""
    if len(correct) == 0:
        raise InputError("mean@k needs at least one sample per problem (got an empty list).")
    return float(np.mean([bool(x) for x in correct]))


def majority_answer(answers: Sequence[Optional[str]], rng: Optional[np.random.Generator] = None) -> Optional[str]:
    """The most frequent normalised answer, ignoring samples without one; None if there is none.

    Ties go to the answer that occurs first in `answers`; pass a numpy `rng` to break them
    uniformly at random instead.
    """
    counts = Counter(a for a in map(normalize_answer, answers) if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    tied = [a for a, n in counts.items() if n == top]  # Counter keeps first-occurrence order
    return tied[0] if rng is None or len(tied) == 1 else tied[int(rng.integers(len(tied)))]


def maj_at_k(answers: Sequence[Optional[str]], correct: Sequence[bool], k: int, samples: int = 200,
             seed: int = 0) -> float:
    """Chance that a majority vote over k of the n samples picks a correct answer.

    The vote is correct when any voting sample that gave the winning (normalised) answer is
    marked correct. With k == n this is one exact vote over all samples; otherwise it is the
    mean over `samples` random size-k subsets (without replacement), deterministic for `seed`.
    """
    n = _check_samples(answers, correct)
    if not 1 <= k <= n:
        raise InputError(f"maj@k: k={k} must lie between 1 and the samples per problem n={n}; "
                         f"lower k or draw at least k samples per problem.")
    normalised = [normalize_answer(a) for a in answers]
    if k == n:
        return float(_vote_correct(normalised, correct, range(n)))
    if samples < 1:
        raise InputError(f"maj@k: samples={samples} must be at least 1.")
    rng = np.random.default_rng(seed)
    # sorted subsets keep the original order, so ties still go to the earliest sample
    wins = sum(_vote_correct(normalised, correct, np.sort(rng.choice(n, size=k, replace=False)))
               for _ in range(samples))
    return wins / samples


def _vote_correct(normalised: Sequence[Optional[str]], correct: Sequence[bool], subset: Sequence[int]) -> bool:
    """Whether the majority vote among the samples in `subset` lands on a correct answer."""
    winner = majority_answer([normalised[i] for i in subset])
    return winner is not None and any(bool(correct[i]) for i in subset if normalised[i] == winner)


def _check_samples(answers: Sequence[Any], correct: Sequence[Any]) -> int:
    if len(answers) != len(correct):
        raise InputError(f"{len(answers)} answers but {len(correct)} correctness flags: "
                         f"give one answer (or None) per sample.")
    if len(correct) == 0:
        raise InputError("a problem has no samples: draw at least one sample per problem.")
    return len(correct)


# -- over problems -------------------------------------------------------------------------------


def bootstrap_ci(values: Sequence[float], samples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-problem `values` and its percentile bootstrap interval.

    Problems are resampled with replacement `samples` times; the same seed gives the same
    interval. The interval always contains the mean.
    """
    data = np.asarray(values, dtype=float)
    if data.ndim != 1 or data.size == 0:
        raise InputError("bootstrap_ci needs a non-empty flat list of per-problem values.")
    if samples < 1:
        raise InputError(f"bootstrap_ci: samples={samples} must be at least 1.")
    if not 0.0 < level < 1.0:
        raise InputError(f"bootstrap_ci: level={level} must lie strictly between 0 and 1 (e.g. 0.95).")
    mean = float(data.mean())
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(samples, data.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return mean, min(float(low), mean), max(float(high), mean)


def summarize_eval(problems: list[dict], k: int, seed: int = 0) -> dict:
    """mean@k, pass@k and maj@k with bootstrap intervals, plus the token and time cost per solve.

    Each row: {"correct": [bool]*n, "answers": [str|None]*n, "decoded_tokens": int,
    "wall_seconds": float}; every row must have the same n, and k <= n. A problem is solved
    when at least one of its samples is correct.
    """
    n = _check_rows(problems, k)
    rows = [(list(p["correct"]), list(p["answers"])) for p in problems]
    per_problem = {
        f"mean@{k}": [mean_at_k(c) for c, _ in rows],
        f"pass@{k}": [pass_at_k(n, sum(map(bool, c)), k) for c, _ in rows],
        f"maj@{k}": [maj_at_k(a, c, k, seed=seed + i) for i, (c, a) in enumerate(rows)],
    }
    solved = sum(any(map(bool, c)) for c, _ in rows)
    tokens = int(sum(p.get("decoded_tokens") or 0 for p in problems))
    seconds = float(sum(p.get("wall_seconds") or 0.0 for p in problems))
    summary: dict[str, Any] = {"problems": len(problems), "samples_per_problem": n, "k": k}
    for name, values in per_problem.items():
        value, low, high = bootstrap_ci(values, seed=seed)
        summary[name] = {"value": value, "low": low, "high": high}
    summary.update({
        "solved": solved,
        "decoded_tokens": tokens,
        "decoded_tokens_per_solved": tokens / solved if solved else None,
        "wall_seconds": seconds,
        "wall_seconds_per_solved": seconds / solved if solved else None,
    })
    return summary


def _check_rows(problems: list[dict], k: int) -> int:
    """The common sample count n of the rows, after checking every row against it and k."""
    if not problems:
        raise InputError("summarize_eval got no problems: evaluate at least one problem.")
    counts = []
    for i, row in enumerate(problems):
        missing = [key for key in ("correct", "answers") if key not in row]
        if missing:
            raise InputError(f"problem {i} lacks {', '.join(missing)}: each row needs 'correct' and 'answers'.")
        try:
            counts.append(_check_samples(row["answers"], row["correct"]))
        except InputError as e:
            raise InputError(f"problem {i}: {e}") from None
    if len(set(counts)) > 1:
        raise InputError(f"problems have unequal sample counts ({sorted(set(counts))}): "
                         f"draw the same number of samples for every problem.")
    n = counts[0]
    if not 1 <= k <= n:
        raise InputError(f"k={k} must lie between 1 and the samples per problem n={n}; "
                         f"lower k or draw at least k samples per problem.")
    return n
