"""A fake `trl vllm-serve`: the HTTP routes TRL's VLLMClient calls, on 127.0.0.1 in a thread.

GET /health, GET /v1/models, GET /server_info (logprobs_mode processed_logprobs), POST
/reset_prefix_cache, and POST /v1/completions as vLLM answers TRL's client: token-id prompts (a
batch), `n` choices per prompt, prompt-major, each with `prompt_token_ids`, `token_ids` and
`logprobs` {tokens "token_id:<id>", token_logprobs, top_logprobs}. The "model" samples random
tokens (EOS = 1 with probability 1/8) with made-up log-probs; every request body is kept.
"""

from __future__ import annotations

import json
import random
import threading
from http.server import ThreadingHTTPServer

from fake_server import JSONHandler

EOS = 1


class FakeTRLVLLM:
    def __init__(self, vocab: int, seed: int = 0):
        self.vocab = vocab
        self.rng = random.Random(seed)
        self.requests: list[dict] = []
        self.answers: list[dict] = []
        self.resets = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _choice(self, prompt: list[int], max_tokens: int) -> dict:
        ids, lps = [], []
        for _ in range(max_tokens):
            tok = EOS if self.rng.random() < 1 / 8 else self.rng.randrange(2, self.vocab)
            ids.append(tok)
            lps.append(-round(self.rng.random() * 3, 4))
            if tok == EOS:
                break
        return {"index": 0, "text": "", "prompt_token_ids": prompt, "token_ids": ids,
                "finish_reason": "stop" if ids[-1] == EOS else "length",
                "logprobs": {"tokens": [f"token_id:{t}" for t in ids], "token_logprobs": lps,
                             "top_logprobs": [{} for _ in ids]}}

    def _handler(self):
        fake = self

        class Handler(JSONHandler):
            def _answer(self, payload) -> None:
                self._send(200, payload)

            def do_GET(self):
                if self.path == "/health":
                    self._answer({})
                elif self.path == "/v1/models":
                    self._answer({"object": "list", "data": [{"id": "fake-policy", "object": "model"}]})
                elif self.path.startswith("/server_info"):
                    self._answer({"vllm_config": {"model_config": {"logprobs_mode": "processed_logprobs"}}})
                else:
                    self.send_error(404)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path == "/reset_prefix_cache":
                    with fake.lock:
                        fake.resets += 1
                    self._answer({})
                    return
                if self.path != "/v1/completions":
                    self.send_error(404)
                    return
                assert body["return_token_ids"] and body["logprobs"] == 0
                with fake.lock:
                    fake.requests.append(body)
                    choices = [fake._choice(list(p), body["max_tokens"]) for p in body["prompt"] for _ in range(body["n"])]
                    answer = {"object": "text_completion", "model": body["model"], "choices": choices}
                    fake.answers.append(answer)
                self._answer(answer)

        return Handler
