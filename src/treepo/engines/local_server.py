"""Start and stop a llama-cpp-python completions server on loopback (tests, benchmarks, trying it out).

    with LocalLlamaServer(smollm2_gguf()) as server:     # python -m llama_cpp.server --model ... --port ...
        engine = load_engine(EngineConfig(engine="server", server_url=[server.url]))

Needs `llama-cpp-python[server]` (`bash scripts/setup.sh --server` builds it). One decode thread by
default: on a machine whose cores are shared, llama.cpp's thread barrier makes two threads slower
than one whenever another process holds a core.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import requests

from ..errors import InputError, ServerError


def llama_cpp_server_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("uvicorn") is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Every server process started here, by pid, until it is stopped: `live_servers` lists those still
# running, and an exit handler kills them, so a crash of the caller (a failing test, Ctrl-C during
# start-up) never leaves a server running in its own session.
_STARTED: dict[int, "LocalServerProcess"] = {}
_STARTED_LOCK = threading.Lock()


def live_servers() -> list[int]:
    """Pids of servers started by this process that are still running."""
    with _STARTED_LOCK:
        return [pid for pid, server in _STARTED.items() if server.alive()]


@atexit.register
def _stop_all() -> None:
    with _STARTED_LOCK:
        servers = list(_STARTED.values())
    for server in servers:
        server.kill()


def _group_running(pgid: int) -> bool:
    """Whether a process of group `pgid` runs and is not a zombie (from /proc; True where there is none)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


class LocalServerProcess:
    """A server command run as a child in its own process group; `url` once GET `url + probe` answers.

    Any failure while it starts (it exits, it never answers, an interrupt) kills the whole group before
    the error propagates; `stop` and `kill` end the group too (a server's own children included).
    """

    def __init__(self, command: list[str], url: str, *, name: str = "server", probe: str = "/v1/models",
                 startup_timeout: float = 120.0, log_path: Optional[Path] = None):
        self.url, self.name, self.probe, self.log_path = url, name, probe, log_path
        log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if log is not subprocess.DEVNULL:
                log.close()  # the child holds its own copy
        with _STARTED_LOCK:
            _STARTED[self.process.pid] = self
        try:
            self._wait(startup_timeout)
        except BaseException:
            self.kill()
            raise

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"{self.name} exited with status {self.process.returncode} while starting"
                                  + (f"; see {self.log_path}" if self.log_path else ""))
            try:
                if requests.get(self.url + self.probe, timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise ServerError(f"{self.name} did not answer at {self.url} within {timeout:.0f} s"
                          + (f"; see {self.log_path}" if self.log_path else ""))

    def alive(self) -> bool:
        """Whether the server or anything else in its process group still runs (zombies do not count)."""
        if getattr(self, "_gone", False):  # reaped and its group dead: the pid may belong to someone else now
            return False
        if self.process.poll() is None:
            return True
        try:
            os.killpg(self.process.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return _group_running(self.process.pid)

    def _signal_group(self, sig: int) -> None:
        if getattr(self, "_gone", False):
            return  # never signal a group id that may have been reused
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        """SIGKILL to the whole group, as a crash would: no goodbye to open connections."""
        self._signal_group(signal.SIGKILL)
        self.process.wait()
        deadline = time.monotonic() + 5  # the rest of the group dies (and is reaped by init) shortly
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._gone = not self.alive()
        self._forget()

    def stop(self) -> None:
        """SIGTERM to the group; SIGKILL after 10 s if anything in it still runs."""
        if self.alive():
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.kill()  # whatever is left of the group (and reap the child)

    def _forget(self) -> None:
        if not self.alive():
            with _STARTED_LOCK:
                _STARTED.pop(self.process.pid, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class LocalLlamaServer(LocalServerProcess):
    """`python -m llama_cpp.server` as a child process; `url` once it answers GET /v1/models."""

    def __init__(self, gguf: Path, *, port: Optional[int] = None, n_ctx: int = 2048, threads: int = 1,
                 startup_timeout: float = 120.0, log_path: Optional[Path] = None):
        if not llama_cpp_server_available():
            raise InputError("llama-cpp-python's server is not installed: run `bash scripts/setup.sh --server`.")
        self.port = port or free_port()
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                   "--port", str(self.port), "--n_ctx", str(n_ctx), "--n_threads", str(threads),
                   "--n_threads_batch", str(threads), "--verbose", "false"]
        super().__init__(command, f"http://127.0.0.1:{self.port}", name="llama_cpp.server",
                         startup_timeout=startup_timeout, log_path=log_path)
