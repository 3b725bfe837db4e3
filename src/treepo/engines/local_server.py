"""Start and stop completions servers on loopback (tests, benchmarks, `--launch_server`, weight sync).

    with LlamaCppServer(gguf, parallel=4) as server:       # llama.cpp's C++ llama-server
        engine = load_engine(EngineConfig(engine="server", server_url=[server.url]))

`LlamaCppServer` runs the `llama-server` binary that `bash scripts/build_llama_server.sh` builds
into the cache (`$TREEPO_LLAMA_SERVER` names another binary): token-id prompts, each sampled
token's id and log-prob, `parallel` slots with continuous batching and a prompt cache per slot.
`restart(gguf)` brings it back on the same port with other weights (weight sync).
One decode thread by default: on a machine whose cores are shared, llama.cpp's thread barrier
makes two threads slower than one whenever another process holds a core.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Optional

import requests

from ..errors import InputError, ServerError


LLAMA_SERVER_VERSION = "0.3.36"  # the llama-cpp-python sdist whose vendored llama.cpp the binary is built from


def llama_server_dir() -> Path:
    """Where scripts/build_llama_server.sh puts llama-server and the HF-to-GGUF converter."""
    root = Path(os.environ.get("TREEPO_CACHE", Path.home() / ".cache" / "treepo"))
    return Path(os.environ.get("TREEPO_LLAMA_SERVER_DIR", root / f"llama-server-{LLAMA_SERVER_VERSION}"))


def llama_server_binary() -> Optional[Path]:
    """The llama-server executable ($TREEPO_LLAMA_SERVER, else the built one), or None."""
    path = Path(os.environ.get("TREEPO_LLAMA_SERVER", llama_server_dir() / "llama-server"))
    return path if path.is_file() and os.access(path, os.X_OK) else None


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
        log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if log is not subprocess.DEVNULL:
                log.close()  # the child holds its own copy
        self._gone = False  # only now: a failed Popen leaves a restarted server's old (reaped) process marked gone
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


class LlamaCppServer(LocalServerProcess):
    """llama.cpp's C++ `llama-server` as a child process; `url` once GET /v1/models answers.

    `parallel` slots share a context of `n_ctx` tokens per slot; `model_name` is the name the
    server answers to (`--alias`).
    """

    def __init__(self, gguf: Path, *, port: Optional[int] = None, n_ctx: int = 2048, parallel: int = 4,
                 threads: int = 1, model_name: str = "treepo", startup_timeout: float = 120.0,
                 log_path: Optional[Path] = None):
        binary = llama_server_binary()
        if binary is None:
            raise InputError("llama.cpp's llama-server is not built: run `bash scripts/build_llama_server.sh` (about "
                             "5 minutes on 2 cores, once), or point TREEPO_LLAMA_SERVER at a llama-server binary.")
        if not Path(gguf).is_file():
            raise InputError(f"llama-server: no GGUF file at {gguf}.")
        self.binary, self.gguf, self.n_ctx, self.parallel, self.threads = binary, Path(gguf), n_ctx, parallel, threads
        self.model_name, self.startup_timeout = model_name, startup_timeout
        self.port = port or free_port()
        super().__init__(self._command(), f"http://127.0.0.1:{self.port}", name="llama-server",
                         startup_timeout=startup_timeout, log_path=log_path)

    def _command(self) -> list[str]:
        return [str(self.binary), "--model", str(self.gguf), "--host", "127.0.0.1", "--port", str(self.port),
                "--ctx-size", str(self.n_ctx * self.parallel), "--parallel", str(self.parallel),
                "--threads", str(self.threads), "--threads-batch", str(self.threads), "--alias", self.model_name,
                "--no-webui", "--cont-batching", "--no-warmup"]

    def restart(self, gguf: Path) -> None:
        """Stop the server and start it again on the same port with the weights in `gguf` (empty caches)."""
        self.stop()
        self.gguf = Path(gguf)
        LocalServerProcess.__init__(self, self._command(), self.url, name=self.name,
                                    startup_timeout=self.startup_timeout, log_path=self.log_path)
