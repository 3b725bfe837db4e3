"""Time-limited calls for reward functions: a scorer may not stall the run.

- Built-in scorers get `timeout` seconds per completion. In the main thread a SIGALRM interval
  timer (`signal.setitimer`, which takes fractions of a second) interrupts the runaway
  computation itself, by raising an exception that derives from BaseException so library
  `except Exception` blocks cannot swallow it; an outer timer (e.g. pytest-timeout's) is put back
  afterwards. Elsewhere (another thread, or an outer timer due sooner) the call runs in a daemon
  thread that is abandoned at the limit. math_verify's own signal-based timeouts are switched off
  (`parsing_timeout=None`, `timeout_seconds=None`): they break outside the main thread and
  `signal.alarm` only takes whole seconds.
- A custom function gets one call per batch, in a daemon worker thread, limited to
  `timeout * len(completions)` seconds (the per-completion budget, scaled to the batch). At the
  limit every completion of the call is a 'timeout'; the thread cannot be stopped, so it is
  abandoned (logged once) and its late result ignored.
Neither mechanism can interrupt one long C call that holds the GIL (e.g. a huge integer power).
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional


class Deadline(BaseException):
    """Raised by our SIGALRM handler; a BaseException so a library's `except Exception` lets it by."""


@dataclass
class CallResult:
    status: str  # 'ok' | 'raised' | 'timeout'
    value: Any = None
    error: Optional[BaseException] = None
    abandoned: bool = False  # timed out in a thread that still runs


def alarm_usable(seconds: float) -> bool:
    """Whether a SIGALRM timer can bound a call here: main thread, POSIX, no outer alarm due first."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGALRM) is None:  # a handler installed from C: we could not restore it
        return False
    outer_remaining, _ = signal.getitimer(signal.ITIMER_REAL)
    return not 0 < outer_remaining <= seconds


def call_with_alarm(fn: Callable[[], Any], seconds: float) -> CallResult:
    armed = True

    def on_alarm(signum, frame):
        if armed:  # a signal that lands after the call finished is ignored
            raise Deadline()

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    started = time.monotonic()
    outer_remaining, outer_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        try:
            return CallResult("ok", fn())
        finally:
            armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
    except Deadline:
        return CallResult("timeout")
    except Exception as e:
        return CallResult("raised", error=e)
    finally:
        signal.signal(signal.SIGALRM, old_handler)
        if outer_remaining > 0:  # give an outer timer (pytest-timeout, the caller's) its remaining time back
            left = max(outer_remaining - (time.monotonic() - started), 1e-6)
            signal.setitimer(signal.ITIMER_REAL, left, outer_interval)


def call_in_thread(fn: Callable[[], Any], seconds: float, name: str) -> CallResult:
    """Run fn in a daemon thread and wait at most `seconds`; at the limit the thread is abandoned."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - a SystemExit in a user function is a failure too
            box["error"] = e

    thread = threading.Thread(target=work, name=f"treepo-reward:{name}", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        return CallResult("timeout", abandoned=True)
    if "error" in box:
        return CallResult("raised", error=box["error"])
    return CallResult("ok", box.get("value"))


def call_with_timeout(fn: Callable[[], Any], seconds: float, name: str) -> CallResult:
    """Interrupt fn by SIGALRM where possible, else run it in an abandonable thread."""
    if alarm_usable(seconds):
        return call_with_alarm(fn, seconds)
    return call_in_thread(fn, seconds, name)
