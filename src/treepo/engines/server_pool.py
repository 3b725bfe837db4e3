"""The HTTP side of the server engine: several OpenAI-compatible servers behind one `post`.

`ServerPool.post(path, body, parse)` sends one request to a server chosen by the routing rule
(`round_robin`, or `least_loaded` = fewest requests in flight), and retries, with exponential
backoff and on another server when there is one, whatever may pass on a second try:

- the connection is refused, reset or dropped mid-request; the answer takes longer than the timeout;
- the server answers 408, 429 or 5xx;
- the body is not JSON, or `parse` finds it unusable (raises `Unusable`: garbage).

Any other 4xx is the request's fault and fails at once. When the retries are spent, a `ServerError`
names every server tried and its last error. Per-server accounting (requests, prompt, completion and
cached prompt tokens, retries, failures, busy seconds) is kept as answers arrive.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import requests
from requests.adapters import HTTPAdapter

from ..errors import ServerError

RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class Unusable(Exception):
    """An answer that arrived but cannot be used (garbage): worth another try."""


@dataclass
class ServerStats:
    url: str
    requests: int = 0  # completion requests answered with a usable result
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: Optional[int] = None  # None while the server reports no cache hits at all
    retries: int = 0  # failed attempts on this server that were tried again
    failures: int = 0  # failed attempts on this server (retried or not)
    busy_seconds: float = 0.0  # wall time of this server's answered requests, summed

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Usage:
    """What one answer cost, as the server reported it (cached_tokens None when it does not say)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: Optional[int] = None


class _Server:
    def __init__(self, url: str):
        self.url = url
        self.stats = ServerStats(url)
        self.in_flight = 0
        self.down_until = 0.0  # after a transport failure, routing avoids the server until then


def base_url(url: str) -> str:
    """`http://host:8000/v1/` -> `http://host:8000`: paths are added as /v1/..."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class ServerPool:
    def __init__(self, urls: list[str], *, timeout: float, retries: int, routing: str = "least_loaded",
                 concurrency: int = 8, backoff: float = 0.5):
        self.servers = [_Server(base_url(u)) for u in urls]
        self.timeout, self.retries, self.routing, self.backoff = timeout, retries, routing, backoff
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=len(self.servers), pool_maxsize=max(concurrency, 1), max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._lock = threading.Lock()
        self._turn = 0

    def close(self) -> None:
        self.session.close()

    def reset_stats(self) -> None:
        with self._lock:
            for s in self.servers:
                s.stats = ServerStats(s.url)

    def report(self) -> list[dict]:
        with self._lock:
            return [s.stats.as_dict() for s in self.servers]

    # -- one request, retried ---------------------------------------------------------------
    def post(self, path: str, body: dict, parse: Callable[[dict], tuple[Any, Usage]], *,
             server: Optional[_Server] = None) -> Any:
        """`parse(answer_json) -> (result, usage)` on the first usable answer; retried as described above.

        `server` pins the request to one server (startup checks); otherwise routing chooses each try.
        """
        errors: dict[str, str] = {}
        last: Optional[_Server] = None
        for attempt in range(self.retries + 1):
            target = self._hold(server) if server else self._pick(avoid=last)
            started = time.monotonic()
            try:
                answer = self._send(target, "POST", path, body)
                result, usage = parse(answer)
            except (requests.RequestException, Unusable, _Retry) as e:
                errors[target.url] = _describe(e)
                self._failed(target, transport=isinstance(e, requests.RequestException),
                             retried=attempt < self.retries)
                last = target
                if attempt < self.retries:
                    time.sleep(min(self.backoff * 2 ** attempt, 10.0))
                continue
            finally:
                with self._lock:
                    target.in_flight -= 1
            with self._lock:
                s = target.stats
                s.requests += 1
                s.prompt_tokens += usage.prompt_tokens
                s.completion_tokens += usage.completion_tokens
                if usage.cached_tokens is not None:
                    s.cached_prompt_tokens = (s.cached_prompt_tokens or 0) + usage.cached_tokens
                s.busy_seconds += time.monotonic() - started
            return result
        tried = "; ".join(f"{url}: {err}" for url, err in errors.items())
        raise ServerError(
            f"POST {path} failed {self.retries + 1} times ({tried}). Check that the server is up and serves the "
            f"model (or raise --server-timeout / --server-retries); the rollout stopped and wrote nothing."
        )

    def get(self, server: _Server, path: str) -> dict:
        """GET with the same retries (startup checks: a server may still be loading its model)."""
        err = ""
        for attempt in range(self.retries + 1):
            try:
                try:
                    return self._send(self._hold(server), "GET", path, None)
                finally:
                    with self._lock:
                        server.in_flight -= 1
            except (requests.RequestException, _Retry) as e:
                err = _describe(e)
                if attempt < self.retries:
                    time.sleep(min(self.backoff * 2 ** attempt, 10.0))
        raise ServerError(f"cannot reach server {server.url} (GET {path}: {err}): is it running at that address?")

    # -- internals ------------------------------------------------------------------------
    def _pick(self, avoid: Optional[_Server]) -> _Server:
        with self._lock:
            now = time.monotonic()
            choices = [s for s in self.servers if s is not avoid and s.down_until <= now]
            choices = choices or [s for s in self.servers if s is not avoid] or self.servers
            if self.routing == "round_robin":
                self._turn += 1
                pick = choices[self._turn % len(choices)]
            else:
                pick = min(choices, key=lambda s: (s.in_flight, s.stats.requests))
            pick.in_flight += 1
            return pick

    def _hold(self, server: _Server) -> _Server:
        with self._lock:
            server.in_flight += 1
        return server

    def _send(self, server: _Server, method: str, path: str, body: Optional[dict]) -> dict:
        reply = self.session.request(method, server.url + path, json=body,
                                     timeout=(min(10.0, self.timeout), self.timeout))
        if reply.status_code in RETRY_STATUS:
            raise _Retry(f"HTTP {reply.status_code} {_detail(reply)}")
        if reply.status_code >= 400:
            raise HTTPRefused(server.url, method, path, reply.status_code, _detail(reply))
        try:
            answer = reply.json()
        except ValueError as e:
            raise Unusable(f"not JSON: {reply.text[:80]!r}") from e
        if not isinstance(answer, dict):
            raise Unusable(f"expected a JSON object, got {type(answer).__name__}")
        return answer

    def _failed(self, server: _Server, *, transport: bool, retried: bool) -> None:
        with self._lock:
            server.stats.failures += 1
            server.stats.retries += int(retried)
            if transport:
                server.down_until = time.monotonic() + self.backoff * 4


class _Retry(Exception):
    """A status worth another try (408, 429, 5xx)."""


class HTTPRefused(Exception):
    """A 4xx answer other than 408/429: the request itself is wrong, so it is not retried."""

    def __init__(self, url: str, method: str, path: str, status: int, detail: str):
        super().__init__(f"{method} {url}{path} answered HTTP {status}: {detail}")
        self.url, self.path, self.status, self.detail = url, path, status, detail


def _detail(reply: requests.Response) -> str:
    try:
        body = reply.json()
    except ValueError:
        return reply.text[:200].strip()
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body))
        if isinstance(err, dict):
            err = err.get("message", err)
        return json.dumps(err)[:300] if not isinstance(err, str) else err[:300]
    return json.dumps(body)[:300]


def _describe(e: Exception) -> str:
    if isinstance(e, requests.Timeout):
        return "timed out"
    if isinstance(e, requests.ConnectionError):
        # requests nests urllib3's errors; the OS's reason ("[Errno 111] Connection refused") is the useful part,
        # and a cut of the whole text would end mid-string
        reason = re.search(r"\[Errno -?\d+\][^'\")]*", str(e))
        return f"connection failed ({reason.group(0).strip() if reason else f'{type(e).__name__}: {e}'})"
    if isinstance(e, requests.RequestException):
        return f"{type(e).__name__}: {str(e)[:120]}"
    return f"unusable answer ({e})" if isinstance(e, Unusable) else str(e)
