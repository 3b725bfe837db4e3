"""The progress bar every long job shows (rollout, evaluation, training).

On a terminal it is rich's live bar. On anything else (a log file, CI, a pipe) rich would draw it
only once, at the end, so the job would look hung: there it prints a plain line at the first update
and then at most every `LINE_EVERY` seconds.
"""

from __future__ import annotations

import time
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

LINE_EVERY = 10.0  # seconds between plain progress lines on a console that is not a terminal


class _Progress(Progress):
    def __init__(self, *columns, unit: str, line_every: float, **kwargs):
        super().__init__(*columns, **kwargs)
        self.unit = unit
        self.line_every = line_every
        self._lines = not self.console.is_terminal
        self._last_line: Optional[float] = None

    def update(self, task_id: TaskID, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._line(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._line(task_id)

    def _line(self, task_id: TaskID) -> None:
        if not self._lines:
            return
        now = time.monotonic()
        if self._last_line is not None and now - self._last_line < self.line_every:
            return
        self._last_line = now
        task = self._tasks[task_id]
        total = "?" if task.total is None else f"{task.total:.0f}"
        info = task.fields.get("info") or ""
        self.console.print(f"{task.description}: {task.completed:.0f}/{total} {self.unit}, "
                           f"{task.elapsed or 0:.0f} s" + (f", {info}" if info else ""), highlight=False)


def progress_bar(console: Console, unit: str = "prompts", line_every: float = LINE_EVERY) -> Progress:
    """A bar with done/total `unit`, elapsed time and a free-text `info` field (pass `info=` to add_task)."""
    return _Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
        unit=unit,
        line_every=line_every,
    )


class Throughput:
    """Tokens per second so far and an upper-bound time left, for a progress line."""

    def __init__(self, most_tokens: int):
        self.most_tokens = most_tokens  # an upper bound on the tokens the job decodes
        self.started = time.perf_counter()
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def describe(self) -> str:
        seconds = time.perf_counter() - self.started
        if not self.tokens or seconds <= 0:
            return ""
        rate = self.tokens / seconds
        left = max(self.most_tokens - self.tokens, 0) / rate
        return f"{rate:.0f} tok/s, at most ~{_duration(left)} left"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
