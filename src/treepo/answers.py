"""Answer extraction: the one place that decides what a completion's final answer is.

The sampler (does the response hold an answer yet?), the rewards (what answer to score), the
evaluation (majority vote) and the environments all call these:

- `last_boxed`: the content of the last complete, brace-balanced `\\boxed{...}` (or `\\fbox{...}`);
- `has_boxed_answer`: the default answer predicate (a complete box is present);
- `extract_answer`: the box's content, else the last number (small models rarely write a box);
- `normalize_answer`: the form answers are compared in for a majority vote.
"""

from __future__ import annotations

import re
from typing import Optional

_BOX_OPENERS = ("\\boxed{", "\\fbox{")
_SPACES = re.compile(r"\s+")
# A number: optional minus (not when it joins two terms, as in "10-12"), then digits with
# thousands separators ("1,234,567") or plain digits, then an optional decimal part; or ".5".
_NUMBER = re.compile(r"(?:(?<![\w)\]}])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<!\d)\.\d+")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last complete, brace-balanced `\\boxed{...}` (or `\\fbox{...}`), else None.

    `\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`; an unclosed box gives None.
    """
    best: Optional[str] = None
    best_at = -1
    for opener in _BOX_OPENERS:
        start = text.rfind(opener)
        while start != -1:
            i, level = start + len(opener), 1
            while i < len(text) and level:
                level += {"{": 1, "}": -1}.get(text[i], 0)
                i += 1
            if level == 0:
                if start > best_at:
                    best, best_at = text[start + len(opener) : i - 1], start
                break
            start = text.rfind(opener, 0, start)  # unclosed: an earlier box may be complete
    return best


def has_boxed_answer(text: str) -> bool:
    """The default answer predicate: the response holds a complete `\\boxed{}`."""
    return last_boxed(text) is not None


def extract_answer(text: str) -> Optional[str]:
    """The final answer in a completion, else None.

    The content of the last complete `\\boxed{...}`; an empty box counts as no box. Otherwise the
    last number in the text (`-3`, `2.5`, `1,234` -> `1234`), because small models rarely write a box.
    """
    boxed = last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    numbers_found = _NUMBER.findall(text)
    return numbers_found[-1].replace(",", "") if numbers_found else None


def normalize_answer(answer: Optional[str]) -> Optional[str]:
    """The form answers are compared in: whitespace collapsed, ends stripped, trailing '.' dropped.

    None, and an answer that is empty after normalising, mean "no answer" (None).
    """
    if answer is None:
        return None
    text = _SPACES.sub(" ", str(answer)).strip().rstrip(".").rstrip()
    return text or None
