"""Weight sync to vLLM servers: reload from a folder of safetensors, or the native NCCL weight transfer.

vLLM's RL routes exist only on a server started with `VLLM_SERVER_DEV_MODE=1` (NCCL also needs
`--weight-transfer-config '{"backend": "nccl"}'`). Read in vllm-project/vllm main
(`vllm/entrypoints/serve/dev/rlhf/api_router.py` @0100a212, `dev/rpc/api_router.py` @cd20a578,
`dev/cache/api_router.py` @b35f7c2b, `vllm/distributed/weight_transfer/nccl_engine.py` @71364e12,
`vllm/v1/worker/gpu_model_runner.py` reload_weights, `examples/rl/rlhf_http_nccl.py` @27cb2fe8):

- `POST /pause?mode=wait`: finish the requests in flight, start no new ones (also clears the
  caches). Older releases ignore `mode` (they then abort the requests in flight).
- `POST /resume`.
- `POST /reset_prefix_cache`: drop the prefix cache (200, no body).
- `POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": folder,
  "is_checkpoint_format": true}, "timeout": s}`: every worker reloads the model's weights in place
  from that folder's safetensors (`GPUModelRunner.reload_weights(weights_path=...)`; releases
  without `weights_path` answer with an error). Answer `{"results": [...]}`.
- `GET /get_world_size`: `{"world_size": TP x PP x DP}`, checked against --nccl_server_ranks.
- `POST /init_weight_transfer_engine {"init_info": {"master_address", "master_port",
  "rank_offset", "world_size"}}`: worker k of the server joins rank rank_offset + k of a stateless
  NCCL group (see `collective.PyNcclGroup`); it answers once joined, so it runs in a thread while
  the trainer opens rank 0 (as vLLM's example does).
- `POST /start_weight_update {"is_checkpoint_format": true}`, then `POST /update_weights
  {"update_info": {"names", "dtype_names", "shapes", "packed": false}}` (dtype names as in
  `getattr(torch, name)`: "bfloat16", ...; the workers receive one broadcast per tensor in that
  order and load it; the call answers after the last, so it runs in a thread while the trainer
  broadcasts), then `POST /finish_weight_update {"weight_version"}`. Releases before the start /
  finish routes (404) take `update_weights` alone.
- `POST /v1/completions {"prompt": ids, "max_tokens": 1, "prompt_logprobs": 1, "temperature": 1}`:
  the probe's log-probs from `choices[0].prompt_logprobs`, a list over the prompt tokens whose
  first entry is null and whose others map a token id (a string) to {logprob, rank, decoded_token}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .base import WeightSync, WeightSyncError, post_json
from .collective import alongside, dtype_name, open_group, save_weights

CONTROL_TIMEOUT = 60.0  # seconds for a control route (pause, flush, probe); loads get --sync_timeout
GLOO_GROUP = "treepo_vllm_gloo"  # --nccl_backend gloo only: the c10d group a CPU test fake joins instead
DEV_MODE = "start vLLM with VLLM_SERVER_DEV_MODE=1 (its weight-update routes exist only then)"


def _is_404(err: WeightSyncError) -> bool:
    return err.status == 404


class _VLLMSync(WeightSync):
    def _timeout(self) -> float:
        return min(CONTROL_TIMEOUT, self.cfg.sync_timeout)

    def _post(self, url: str, path: str, body: Optional[dict], what: str, *, timeout: Optional[float] = None,
              method: str = "POST") -> dict:
        try:
            return post_json(url, path, body, timeout=timeout or self._timeout(), what=what, method=method)
        except WeightSyncError as e:
            if _is_404(e):
                raise WeightSyncError(f"server {url} has no {method} {path} ({what}): {DEV_MODE}, and a release "
                                      "with the RL weight-update API.") from None
            raise

    def pause(self) -> None:
        for url in self.urls():
            self._post(url, "/pause?mode=wait", None, "pause generation")

    def resume(self) -> None:
        for url in self.urls():
            self._post(url, "/resume", None, "resume generation")

    def flush(self) -> None:
        for url in self.urls():
            self._post(url, "/reset_prefix_cache", None, "reset the prefix cache")

    def _model_name(self, url: str) -> str:
        name = getattr(self.engine, "model_name", None)
        if name:
            return name
        listing = post_json(url, "/v1/models", None, timeout=self._timeout(), what="list models", method="GET")
        return listing["data"][0]["id"]

    def prompt_logprobs(self, url: str, ids: list[int], start: int) -> list[float]:
        body = {"model": self._model_name(url), "prompt": list(ids), "max_tokens": 1, "temperature": 1.0,
                "prompt_logprobs": 1}
        answer = post_json(url, "/v1/completions", body, timeout=self._timeout(), what="probe log-probs")
        try:
            rows = answer["choices"][0]["prompt_logprobs"]  # [None, {"<id>": {logprob, rank, decoded_token}}, ...]
            if len(rows) != len(ids):
                raise ValueError(f"{len(rows)} entries for {len(ids)} prompt tokens")
            return [float(rows[t][str(ids[t])]["logprob"]) for t in range(start, len(ids))]
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise WeightSyncError(f"server {url}: POST /v1/completions gave no usable choices[0].prompt_logprobs for "
                                  f"the probe ({type(e).__name__}: {e}); is it a vLLM server?") from None


class VLLMDiskSync(_VLLMSync):
    """Writes the policy's safetensors to the sync dir; every server's workers reload from there."""

    name = "vLLM disk weight sync"

    def __init__(self, cfg, engine, model, tokenizer, *, sync_dir: Optional[Path] = None):
        super().__init__(cfg, engine, model, tokenizer, sync_dir=sync_dir)
        self.require_sync_dir("vLLM")

    def send(self, model, step: int) -> int:
        folder, written = save_weights(model, self.tokenizer, self.sync_dir, step)
        body = {"method": "reload_weights", "kwargs": {"weights_path": str(folder), "is_checkpoint_format": True},
                "timeout": self.cfg.sync_timeout}
        for url in self.urls():
            self._post(url, "/collective_rpc", body, f"reload the weights of step {step} from {folder}; the server "
                       "must read --sync_dir at that path", timeout=self.cfg.sync_timeout + 5)
        return written


class VLLMNcclSync(_VLLMSync):
    """vLLM's native weight transfer: the trainer (rank 0) broadcasts every parameter to the servers' workers."""

    name = "vLLM NCCL weight sync"

    def __init__(self, cfg, engine, model, tokenizer, *, sync_dir: Optional[Path] = None):
        super().__init__(cfg, engine, model, tokenizer)
        self.group = None
        urls, ranks = self.urls(), cfg.nccl_server_ranks
        for url in urls:
            workers = self._post(url, "/get_world_size", None, "count its workers", method="GET").get("world_size")
            if workers != ranks:
                raise WeightSyncError(f"server {url} has {workers} GPU workers (TP x PP x DP) but --nccl_server_ranks "
                                      f"is {ranks}: pass --nccl_server_ranks {workers}.")
        self.world_size = 1 + len(urls) * ranks
        calls = {url: self._init_call(url, 1 + i * ranks) for i, url in enumerate(urls)}
        try:
            alongside(self._open_group, calls, timeout=cfg.sync_timeout, what="joining the weight-transfer group")
        except BaseException:
            self.close()
            raise

    def _open_group(self) -> None:
        self.group = open_group("pynccl", self.cfg, self.world_size, GLOO_GROUP)

    def _init_call(self, url: str, rank_offset: int):
        c = self.cfg
        body = {"init_info": {"master_address": c.nccl_master_address, "master_port": c.nccl_master_port,
                              "rank_offset": rank_offset, "world_size": self.world_size}}
        return lambda: self._post(url, "/init_weight_transfer_engine", body, "join the weight-transfer group at "
                                  f"{c.nccl_master_address}:{c.nccl_master_port} as ranks {rank_offset}.. (the "
                                  "server needs --weight-transfer-config '{\"backend\": \"nccl\"}')",
                                  timeout=c.sync_timeout)

    def send(self, model, step: int) -> int:
        named = [(n, p) for n, p in model.named_parameters()]  # tied weights once; [*shape] in the policy's dtype
        info = {"names": [n for n, _ in named], "dtype_names": [dtype_name(p) for _, p in named],
                "shapes": [list(p.shape) for _, p in named], "packed": False}
        staged = []  # servers with the start / finish routes
        for url in self.urls():
            try:
                post_json(url, "/start_weight_update", {"is_checkpoint_format": True}, timeout=self._timeout(),
                          what=f"start the weight update of step {step}")
                staged.append(url)
            except WeightSyncError as e:
                if not _is_404(e):
                    raise
        calls = {url: (lambda url=url: self._post(url, "/update_weights", {"update_info": info},
                                                  f"receive the weights of step {step}", timeout=self.cfg.sync_timeout))
                 for url in self.urls()}
        sent = alongside(lambda: self.group.broadcast(named), calls, timeout=self.cfg.sync_timeout,
                         what=f"the weight broadcast of step {step}")
        for url in staged:
            self._post(url, "/finish_weight_update", {"weight_version": f"step-{step}"},
                       f"finish the weight update of step {step}", timeout=self.cfg.sync_timeout)
        return sent

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None
        self.release()
