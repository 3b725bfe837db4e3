"""Start and stop a llama-cpp-python completions server on loopback (tests, benchmarks, trying it out).

    with LocalLlamaServer(smollm2_gguf()) as server:     # python -m llama_cpp.server --model ... --port ...
        engine = load_engine(EngineConfig(engine="server", server_url=[server.url]))

Needs `llama-cpp-python[server]` (`bash scripts/setup.sh --server` builds it). One decode thread by
default: on a machine whose cores are shared, llama.cpp's thread barrier makes two threads slower
than one whenever another process holds a core.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
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


class LocalLlamaServer:
    """`python -m llama_cpp.server` as a child process; `url` once it answers GET /v1/models."""

    def __init__(self, gguf: Path, *, port: Optional[int] = None, n_ctx: int = 2048, threads: int = 1,
                 startup_timeout: float = 120.0, log_path: Optional[Path] = None):
        if not llama_cpp_server_available():
            raise InputError("llama-cpp-python's server is not installed: run `bash scripts/setup.sh --server`.")
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                   "--port", str(self.port), "--n_ctx", str(n_ctx), "--n_threads", str(threads),
                   "--n_threads_batch", str(threads), "--verbose", "false"]
        log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait(startup_timeout)

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"llama_cpp.server exited with status {self.process.returncode} while starting"
                                  + (f"; see {self.log_path}" if self.log_path else ""))
            try:
                if requests.get(self.url + "/v1/models", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.stop()
        raise ServerError(f"llama_cpp.server did not answer at {self.url} within {timeout:.0f} s")

    def kill(self) -> None:
        """SIGKILL, as a crash would: no goodbye to open connections."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> "LocalLlamaServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
