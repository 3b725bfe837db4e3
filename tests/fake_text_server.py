"""An in-process stand-in for llama-cpp-python's server (`python -m llama_cpp.server`): the text dialect.

It speaks that server's routes as llama-cpp-python 0.3.36 does (read in its `llama_cpp/server/app.py`,
`server/types.py` and `llama.py` `_create_completion`), with a tiny torch causal LM in place of llama.cpp:

- GET /v1/models: `{"object": "list", "data": [{"id", "object": "model", "owned_by": "me", "permissions": []}]}`;
- POST /extras/tokenize `{"input", "model"?}`: `{"tokens": [...]}`, the text tokenised with special tokens
  parsed (and BOS first when the model adds one);
- POST /v1/completions: `prompt` must be text (a list of ids is a 422, as its pydantic request model
  allows only `str | list[str]`); the prompt is tokenised the same way; up to `max_tokens` tokens are
  drawn at `temperature` (0: greedy) with `top_k` (<= 0: all) and `top_p`, under `seed`; EOS ends the
  completion with `finish_reason` "stop" and is not returned; `min_tokens` masks EOS until that many
  tokens (for sampling only: the log-probs stay the raw ones); with `logprobs` (an int) the answer has
  `logprobs.tokens` (each token's own bytes decoded as UTF-8 with errors="ignore", so a piece of a
  character comes back as "" or a fragment), `token_logprobs` (log_softmax of the raw logits, before
  temperature), `top_logprobs` and `text_offset`; `usage` has prompt_tokens and completion_tokens only
  (no cached-token count).
- /tokenize, /completion: 404, as FastAPI answers routes the server does not have.

A request field the real server does not know is ignored there, silently; here it is ignored too, and
recorded in `ignored_fields` so a test can see that every field the engine sends means something.
`requests` records each completion: its body, the prompt's ids as the server tokenised them, and the
ids it sampled (EOS included when it stopped there).
"""

from __future__ import annotations

import json
import threading
from typing import Optional

import torch

from fake_server import JSONHandler, LoopbackServer

COMPLETION_FIELDS = {  # llama-cpp-python 0.3.36 CreateCompletionRequest
    "model", "prompt", "suffix", "max_tokens", "min_tokens", "temperature", "top_p", "min_p", "echo", "stop",
    "stream", "logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "seed", "n", "best_of", "user",
    "top_k", "repeat_penalty", "logit_bias_type", "mirostat_mode", "mirostat_tau", "mirostat_eta", "grammar",
}


class FakeLlamaCppPython(LoopbackServer):
    def __init__(self, model, tokenizer, *, model_name: str = "fake-gguf", bos: Optional[int] = None):
        self.model, self.tokenizer, self.model_name, self.bos = model.eval(), tokenizer, model_name, bos
        self.eos = tokenizer.eos_token_id
        self.requests: list[dict] = []
        self.routes: list[str] = []
        self.ignored_fields: set[str] = set()
        self.lock = threading.Lock()
        self._serve()

    # -- the model's side ---------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]  # special tokens in the text are parsed
        return ([self.bos] if self.bos is not None else []) + ids

    def piece(self, token: int) -> str:
        """One token's bytes as UTF-8 with errors="ignore" (llama-cpp-python's per-token strings)."""
        text = self.tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return text.replace("\ufffd", "")

    @torch.no_grad()
    def complete(self, body: dict, record: Optional[dict] = None) -> dict:
        """The answer to one completion request; `record` gets the sampled ids (EOS included where it stopped)."""
        record = {} if record is None else record
        prompt = body["prompt"]
        ids = self.tokenize(prompt)
        temperature, top_k = float(body.get("temperature", 0.8)), int(body.get("top_k", 40))
        top_p, min_tokens = float(body.get("top_p", 0.95)), int(body.get("min_tokens", 0))
        assert float(body.get("repeat_penalty", 1.1)) == 1.0 and float(body.get("min_p", 0.05)) == 0.0, \
            "the fake samples without repeat penalty and min_p only"
        gen = torch.Generator().manual_seed(int(body["seed"]) if body.get("seed") is not None else 0)
        out, lps, finish = [], [], "length"
        for _ in range(int(body.get("max_tokens", 16))):
            with self.lock:
                logits = self.model(torch.tensor([ids + out])).logits[0, -1].float()
            logp = torch.log_softmax(logits, -1)  # reported: the raw distribution
            masked = logits.clone()
            if len(out) < min_tokens and self.eos is not None:
                masked[self.eos] = -torch.inf
            if temperature <= 0:
                token = int(masked.argmax())
            else:
                probs = torch.softmax(masked / temperature, -1)
                if 0 < top_k < probs.numel():
                    probs[probs < probs.topk(top_k).values[-1]] = 0
                if top_p < 1.0:
                    sorted_p, order = probs.sort(descending=True)
                    drop = sorted_p.cumsum(0) - sorted_p > top_p * sorted_p.sum()
                    probs[order[drop]] = 0
                token = int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
            if token == self.eos:
                finish = "stop"
                record["sampled"] = out + [token]
                break
            out.append(token)
            lps.append(float(logp[token]))
        else:
            record["sampled"] = list(out)
        pieces = [self.piece(t) for t in out]
        text = self.tokenizer.decode(out, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        choice = {"text": text.replace("\ufffd", ""), "index": 0, "logprobs": None, "finish_reason": finish}
        if body.get("logprobs") is not None:
            offsets, at = [], len(prompt)
            for p in pieces:
                offsets.append(at)
                at += len(p)
            choice["logprobs"] = {"tokens": pieces, "text_offset": offsets, "token_logprobs": lps,
                                  "top_logprobs": [{p: lp} for p, lp in zip(pieces, lps)]}
        return {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": self.model_name,
                "choices": [choice], "usage": {"prompt_tokens": len(ids), "completion_tokens": len(out),
                                               "total_tokens": len(ids) + len(out)}}

    # -- HTTP -----------------------------------------------------------------------------------
    def _handler(self):
        server = self

        class Handler(JSONHandler):
            def do_GET(self):
                server.routes.append(self.path)
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": server.model_name, "object": "model",
                                                                 "owned_by": "me", "permissions": []}]})
                else:
                    self._send(404, {"detail": "Not Found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                server.routes.append(self.path)
                if self.path == "/extras/tokenize":
                    self._send(200, {"tokens": server.tokenize(body["input"])})
                    return
                if self.path != "/v1/completions":
                    self._send(404, {"detail": "Not Found"})
                    return
                if not isinstance(body.get("prompt"), str):
                    self._send(422, {"detail": [{"type": "string_type", "loc": ["body", "prompt"],
                                                 "msg": "Input should be a valid string"}]})
                    return
                with server.lock:
                    server.ignored_fields |= set(body) - COMPLETION_FIELDS
                    server.requests.append({"body": body, "prompt_ids": server.tokenize(body["prompt"])})
                    record = server.requests[-1]
                self._send(200, server.complete(body, record))

        return Handler
