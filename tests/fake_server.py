"""A small in-process OpenAI-compatible completions server (vLLM's dialect) that can be told to misbehave.

It runs `http.server` in a thread on 127.0.0.1 and answers
- GET /v1/models with `models` (404 when `models` is None: not a completions server);
- POST /tokenize with the given tokenizer's ids (shifted by one when `tokenizer_shift`);
- POST /v1/completions: token-id prompts only; the tokens are a deterministic function of
  (prompt ids, seed, position), EOS with probability 1/16 per token unless `ignore_eos`; token ids
  in `token_ids`, log-probs in `logprobs.token_logprobs`, and `usage.prompt_tokens_details.cached_tokens`
  = the longest prefix shared with an earlier prompt (a toy prefix cache).

`faults` is consumed one entry per completion request: "drop" (close the connection without an
answer), "slow" (answer after `slow_seconds`), "garbage" (200 with a non-JSON body), "nochoices"
(200 JSON without choices), "500", or None (answer normally).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

EOS = 1


def token_at(prompt: list[int], seed: int, k: int, vocab: int) -> tuple[int, float]:
    """The fake model: token k of the completion of `prompt` under `seed`, and its log-prob."""
    h = hashlib.sha256(repr((tuple(prompt), seed, k)).encode()).digest()
    if h[0] % 16 == 0:
        return EOS, -2.0 - h[2] / 255
    return 2 + int.from_bytes(h[1:5], "little") % (vocab - 2), -(h[5] / 64.0)


class JSONHandler(BaseHTTPRequestHandler):
    """The fakes' request handler base: no access log, JSON (or raw bytes) answers."""

    def log_message(self, *args):
        pass

    def _send(self, status: int, payload) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a dropped connection is the point of some tests, not news


class LoopbackServer:
    """A fake server's plumbing: `_serve()` answers with `self._handler()` on a free loopback port in a daemon
    thread (`url`); `stop()` or the end of a with-block shuts it."""

    def _serve(self) -> None:
        self.httpd = _QuietServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class FakeServer(LoopbackServer):
    def __init__(self, tokenizer, *, models: Optional[list[str]] = ("fake-model",), faults=(), slow_seconds=1.0,
                 tokenizer_shift: bool = False, max_model_len: Optional[int] = None, delay: float = 0.0):
        self.tokenizer = tokenizer
        self.vocab = len(tokenizer)
        self.models = list(models) if models is not None else None
        self.faults = list(faults)
        self.slow_seconds, self.delay = slow_seconds, delay
        self.tokenizer_shift, self.max_model_len = tokenizer_shift, max_model_len
        self.completions: list[dict] = []  # bodies of the completion requests answered
        self.received = 0  # completion requests received, faulty or not
        self.seen_prompts: list[tuple[int, ...]] = []
        self.lock = threading.Lock()
        self._serve()

    # -- answers ----------------------------------------------------------------------------
    def complete(self, body: dict) -> dict:
        prompt, seed, m = body["prompt"], body.get("seed") or 0, body["max_tokens"]
        assert isinstance(prompt, list) and all(isinstance(t, int) for t in prompt), "token-id prompts only"
        ids, lps = [], []
        for k in range(m):
            tok, lp = token_at(prompt, seed, k, self.vocab)
            if tok == EOS and body.get("ignore_eos"):
                tok = 2
            ids.append(tok)
            lps.append(lp)
            if tok == EOS:
                break
        with self.lock:
            cached = max((_common(prompt, p) for p in self.seen_prompts), default=0)
            self.seen_prompts.append(tuple(prompt) + tuple(ids))
        return {
            "id": "cmpl-fake", "object": "text_completion", "model": body.get("model"),
            "choices": [{"index": 0, "text": "", "token_ids": ids, "finish_reason": "stop" if ids[-1] == EOS else "length",
                         "logprobs": {"tokens": [f"token_id:{t}" for t in ids], "token_logprobs": lps}}],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(ids), "total_tokens": len(prompt) + len(ids),
                      "prompt_tokens_details": {"cached_tokens": cached}},
        }

    def _handler(self):
        server = self

        class Handler(JSONHandler):
            def do_GET(self):
                if self.path == "/v1/models" and server.models is not None:
                    cards = [{"id": m, "object": "model", **({"max_model_len": server.max_model_len}
                                                             if server.max_model_len else {})} for m in server.models]
                    self._send(200, {"object": "list", "data": cards})
                else:
                    self._send(404, {"detail": "Not Found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path == "/tokenize" and server.models is not None:
                    ids = server.tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
                    shift = 1 if server.tokenizer_shift else 0
                    self._send(200, {"tokens": [t + shift for t in ids["input_ids"]]})
                    return
                if self.path != "/v1/completions" or server.models is None:
                    self._send(404, {"detail": "Not Found"})
                    return
                if body.get("model") not in server.models:
                    self._send(404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}})
                    return
                with server.lock:
                    server.received += 1
                    fault = server.faults.pop(0) if server.faults else None
                if server.delay:
                    time.sleep(server.delay)
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault == "slow":
                    time.sleep(server.slow_seconds)
                if fault == "garbage":
                    self._send(200, b"<html>502 upstream hiccup</html>")
                    return
                if fault == "nochoices":
                    self._send(200, {"object": "text_completion", "choices": []})
                    return
                if fault == "500":
                    self._send(500, {"error": {"message": "internal error"}})
                    return
                answer = server.complete(body)
                with server.lock:
                    server.completions.append(body)
                self._send(200, answer)

        return Handler


def _common(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
