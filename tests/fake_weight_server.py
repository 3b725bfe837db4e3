"""An in-process SGLang or vLLM server (`kind`) that holds a tiny torch causal LM and takes weight updates.

It runs `http.server` in a thread on 127.0.0.1 and answers, from its own model (teacher-forced
log_softmax at temperature 1):

- both kinds: GET /v1/models (`owned_by` = kind);
- kind "sglang": POST /generate (meta_info.input_token_logprobs: [[logprob, id, null], ...] from
  logprob_start_len, the first null, as SGLang main does), /pause_generation, /continue_generation,
  GET|POST /flush_cache, /update_weights_from_disk (safetensors of model_path), GET /get_server_info,
  /init_weights_update_group, /update_weights_from_distributed, /destroy_weights_update_group;
- kind "vllm" (dev mode; `dev_mode=False` answers 404 to these routes, as vLLM without
  VLLM_SERVER_DEV_MODE): POST /v1/completions with prompt_logprobs, /pause, /resume,
  /reset_prefix_cache, /collective_rpc (method reload_weights, kwargs weights_path), GET
  /get_world_size, /init_weight_transfer_engine, /start_weight_update, /update_weights,
  /finish_weight_update.

The group routes join the trainer's broadcast over gloo exactly as SGLang's
`init_custom_process_group` does (torch's `rendezvous` + `PrefixStore(group_name)` +
`_new_process_group_helper`), so the trainer's own key chain is checked against torch's; the vLLM
kind joins the same way under `GLOO_GROUP` (vLLM itself only speaks NCCL). Received tensors are
copied into the model by name.

`mode` says how the update routes behave: "ok"; "refuse" (SGLang: HTTP 400 success=false; vLLM:
HTTP 500); "pretend" (answer success, but keep the old weights: a disk update loads nothing, a
broadcast is received and dropped). A dead server is one that was `stop()`ped.
`events` records "pause", "update", "flush", "resume" in the order they came; `cache_stale` is
true between a weight change and the next prefix-cache flush.
"""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world, rendezvous

from fake_server import JSONHandler, LoopbackServer
from treepo.engines.weight_sync.vllm import GLOO_GROUP

ROUTES = {  # route -> (kind, event)
    "/pause_generation": ("sglang", "pause"), "/continue_generation": ("sglang", "resume"),
    "/flush_cache": ("sglang", "flush"), "/update_weights_from_disk": ("sglang", "update"),
    "/update_weights_from_distributed": ("sglang", "update"), "/init_weights_update_group": ("sglang", None),
    "/destroy_weights_update_group": ("sglang", None), "/get_server_info": ("sglang", None),
    "/generate": ("sglang", None),
    "/pause": ("vllm", "pause"), "/resume": ("vllm", "resume"), "/reset_prefix_cache": ("vllm", "flush"),
    "/collective_rpc": ("vllm", "update"), "/update_weights": ("vllm", "update"), "/get_world_size": ("vllm", None),
    "/init_weight_transfer_engine": ("vllm", None), "/start_weight_update": ("vllm", None),
    "/finish_weight_update": ("vllm", None), "/v1/completions": ("vllm", None), "/tokenize": ("vllm", None),
}
DEV_ROUTES = {"/pause", "/resume", "/reset_prefix_cache", "/collective_rpc", "/update_weights", "/get_world_size",
              "/init_weight_transfer_engine", "/start_weight_update", "/finish_weight_update"}


class Refused(Exception):
    pass


class FakeWeightServer(LoopbackServer):
    def __init__(self, kind: str, model, *, mode: str = "ok", model_name: str = "fake-model", workers: int = 1,
                 dev_mode: bool = True, timeout: float = 10.0, tokenizer=None):
        assert kind in ("sglang", "vllm") and mode in ("ok", "refuse", "pretend")
        self.kind, self.model, self.mode, self.model_name = kind, model.eval(), mode, model_name
        self.workers, self.dev_mode, self.timeout, self.tokenizer = workers, dev_mode, timeout, tokenizer
        self.seeds: list[int] = []  # vLLM kind: the seed of every sampled completion
        self.generated_while_stale = 0  # completions sampled between a weight change and the next flush
        self.events: list[str] = []
        self.routes: list[str] = []
        self.bodies: dict[str, dict] = {}
        self.paused = self.cache_stale = False
        self.unpaused_updates = self.loads = 0
        self.pg = None
        self.started = False  # vLLM: between /start_weight_update and /finish_weight_update
        self.lock = threading.Lock()
        self.in_collective = 0  # handler threads inside a torch call (joining the group, receiving a broadcast)
        self.collective_done = threading.Condition()
        self._serve()

    def stop(self) -> None:
        super().stop()
        # A handler thread (a daemon) may still wait in torch for a trainer that gave up: let its own timeout end
        # it now, as a torch call that returns while the interpreter finalises aborts the process (see
        # tests/test_clean_exit.py).
        with self.collective_done:
            self.collective_done.wait_for(lambda: self.in_collective == 0, timeout=2 * self.timeout + 5)
        self._leave()

    def _collective(self, fn, *args) -> None:
        with self.collective_done:
            self.in_collective += 1
        try:
            fn(*args)
        finally:
            with self.collective_done:
                self.in_collective -= 1
                self.collective_done.notify_all()

    def _leave(self) -> None:
        if self.pg is not None:
            dist.destroy_process_group(self.pg)
            self.pg = None

    # -- the model --------------------------------------------------------------------------
    @torch.no_grad()
    def _logprobs(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[T-1] each for t >= 1: log p(ids[t] | ids[:t]), the most likely token there and its log-prob."""
        with self.lock:
            logits = self.model(torch.tensor([ids])).logits[0].float()  # [T, V]
        logp = torch.log_softmax(logits[:-1], -1)  # [T-1, V]: position t-1 predicts t
        top_lp, top = logp.max(-1)
        return logp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1), top, top_lp

    def _set_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.mode == "pretend":
            return
        with self.lock:
            self.model.load_state_dict(tensors, strict=True)
            self.loads += 1
            self.cache_stale = True

    def _load_dir(self, path: str) -> None:
        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise Refused(f"no safetensors in {path}")
        tensors = {}
        for f in files:
            tensors.update(load_file(f))
        self._set_weights(tensors)

    # -- the collective (gloo, as SGLang's init_custom_process_group) ---------------------------
    def _join(self, address: str, port: int, rank_offset: int, world_size: int, group_name: str) -> None:
        t = timedelta(seconds=self.timeout)
        store, rank, _ = next(rendezvous(f"tcp://{address}:{port}", rank_offset, world_size, timeout=t))
        store.set_timeout(t)
        pg, _ = _new_process_group_helper(world_size, rank, [], Backend("gloo"), PrefixStore(group_name, store),
                                          group_name=group_name, timeout=t)
        _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
        self.pg = pg

    def _receive(self, names: list[str], dtypes: list[str], shapes: list[list[int]]) -> None:
        if self.pg is None:
            raise Refused("no weight-update group: join it first")
        got = {}
        for name, dtype, shape in zip(names, dtypes, shapes):
            t = torch.empty(shape, dtype=getattr(torch, dtype))
            dist.broadcast(t, src=0, group=self.pg)
            got[name] = t
        self._set_weights(got)

    # -- answers ------------------------------------------------------------------------------
    def _generate(self, body: dict) -> dict:
        ids, start = body["input_ids"], body.get("logprob_start_len", -1)
        assert body.get("return_logprob") and body["sampling_params"].get("temperature") == 1.0
        lps, top, _ = self._logprobs(ids)
        rows = [[None, ids[start], None]] + [[float(lps[t - 1]), ids[t], None] for t in range(start + 1, len(ids))]
        return {"text": "", "output_ids": [int(top[-1])], "meta_info": {"prompt_tokens": len(ids),
                                                                      "input_token_logprobs": rows}}

    @torch.no_grad()
    def _sample(self, body: dict) -> dict:
        """vLLM's dialect: `max_tokens` tokens drawn from the model at `temperature` under `seed` (EOS stops
        unless ignore_eos), with token_ids and the sampled tokens' log-probs before temperature."""
        ids, gen = list(body["prompt"]), torch.Generator().manual_seed(int(body["seed"]))
        self.seeds.append(int(body["seed"]))
        self.generated_while_stale += self.cache_stale
        eos = self.tokenizer.eos_token_id if self.tokenizer is not None else None
        out, lps, finish = [], [], "length"
        for _ in range(int(body["max_tokens"])):
            with self.lock:
                logits = self.model(torch.tensor([ids + out])).logits[0, -1].float()  # [V]
            logp = torch.log_softmax(logits, -1)
            t = body.get("temperature", 1.0)
            token = int(logits.argmax()) if t == 0 else int(torch.multinomial(torch.softmax(logits / t, -1), 1,
                                                                               generator=gen))
            out.append(token)
            lps.append(float(logp[token]))
            if token == eos and not body.get("ignore_eos"):
                finish = "stop"
                break
        return {"object": "text_completion", "choices": [{
            "index": 0, "text": "", "token_ids": out, "finish_reason": finish,
            "logprobs": {"tokens": [f"token_id:{t}" for t in out], "token_logprobs": lps}}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(out)}}

    def _completions(self, body: dict) -> dict:
        ids = body["prompt"]
        assert body.get("model") == self.model_name
        if body.get("prompt_logprobs") is None:
            return self._sample(body)
        lps, top, top_lp = self._logprobs(ids)
        rows = [None] + [{str(int(top[t - 1])): {"logprob": float(top_lp[t - 1]), "rank": 1, "decoded_token": "?"},
                          str(ids[t]): {"logprob": float(lps[t - 1]), "rank": 1, "decoded_token": "?"}}
                         for t in range(1, len(ids))]  # the top-1 entry, then the prompt token's (they may be one)
        return {"object": "text_completion", "choices": [{"index": 0, "text": "", "prompt_logprobs": rows,
                                                          "finish_reason": "length"}]}

    def _update(self, route: str, body: dict, query: dict) -> dict:
        if self.mode == "refuse":
            raise Refused("the fake was told to refuse weight updates")
        if not self.paused:
            self.unpaused_updates += 1
        if route == "/update_weights_from_disk":
            self._load_dir(body["model_path"])
        elif route == "/collective_rpc":
            if body.get("method") != "reload_weights":
                raise Refused(f"unknown method {body.get('method')}")
            self._load_dir(body["kwargs"]["weights_path"])
            return {"results": [None] * self.workers}
        elif route == "/update_weights_from_distributed":
            self._collective(self._receive, body["names"], body["dtypes"], body["shapes"])
        else:  # vLLM /update_weights
            if not self.started:
                raise Refused("update_weights before start_weight_update")
            info = body["update_info"]
            self._collective(self._receive, info["names"], info["dtype_names"], info["shapes"])
            return {"message": "Weights updated"}
        return {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}

    def answer(self, method: str, route: str, body: dict, query: dict):
        if route == "/v1/models":
            return 200, {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": self.kind,
                                                     "max_model_len": 512}]}
        kind, event = ROUTES.get(route, (None, None))
        if kind != self.kind or (kind == "vllm" and route in DEV_ROUTES and not self.dev_mode):
            return 404, {"detail": "Not Found"}
        if route not in ("/generate", "/v1/completions", "/get_server_info", "/get_world_size", "/tokenize"):
            self.routes.append(route)
            self.bodies[route] = body
        if event:
            self.events.append(event)
        if event == "update":
            return 200, self._update(route, body, query)
        if event == "pause":
            self.paused = True
            return 200, ({"message": "Generation paused successfully.", "status": "ok"} if kind == "sglang"
                         else {"status": "paused"})
        if event == "resume":
            self.paused = False
            return 200, {"status": "ok"} if kind == "sglang" else {"status": "resumed"}
        if event == "flush":
            self.cache_stale = False
            return 200, b"Cache flushed.\n" if kind == "sglang" else b""
        if route == "/generate":
            return 200, self._generate(body)
        if route == "/v1/completions":
            return 200, self._completions(body)
        if route == "/tokenize" and self.tokenizer is not None:
            return 200, {"tokens": self.tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens",
                                                                                             True))["input_ids"]}
        if route == "/get_server_info":
            return 200, {"tp_size": self.workers, "pp_size": 1, "dp_size": 1, "version": "fake"}
        if route == "/get_world_size":
            return 200, {"world_size": self.workers}
        if route == "/init_weights_update_group":
            if body["backend"] != "gloo":
                raise Refused("the fake joins over gloo only")
            self._collective(self._join, body["master_address"], body["master_port"], body["rank_offset"],
                             body["world_size"], body["group_name"])
            return 200, {"success": True, "message": "Succeeded to initialize custom process group."}
        if route == "/init_weight_transfer_engine":
            i = body["init_info"]
            self._collective(self._join, i["master_address"], i["master_port"], i["rank_offset"], i["world_size"],
                             GLOO_GROUP)
            return 200, {"message": "Weight transfer initialized"}
        if route == "/destroy_weights_update_group":
            self._leave()
            return 200, {"success": True, "message": "Succeeded to destroy custom process group."}
        if route in ("/start_weight_update", "/finish_weight_update"):
            self.started = route == "/start_weight_update"
            return 200, {"message": "ok"}
        return 404, {"detail": "Not Found"}

    def _handler(self):
        server = self

        class Handler(JSONHandler):
            def _serve(self, method: str) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                body = json.loads(raw) if raw else {}
                parts = urlsplit(self.path)
                try:
                    status, payload = server.answer(method, parts.path, body or {}, parse_qs(parts.query))
                except Refused as e:
                    status, payload = ((400, {"success": False, "message": str(e)}) if server.kind == "sglang"
                                       else (500, {"error": str(e)}))
                self._send(status, payload)

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

        return Handler
