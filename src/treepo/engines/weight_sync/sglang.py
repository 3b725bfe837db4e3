"""Weight sync to SGLang servers: from a folder of safetensors, or broadcast over an NCCL group.

Routes, as read in sgl-project/sglang main (`python/sglang/srt/entrypoints/http_server.py` @0025436e,
`managers/io_struct.py` @001067ff, `managers/tokenizer_manager.py`, `model_executor/weight_updater.py`,
the scheduler's `_process_input_token_logprobs`, `test/srt/rl/test_update_weights_from_distributed.py`);
older releases (as far as read) ignore the body fields they do not know:

- `POST /pause_generation {"mode": "retract"}`: no new forward passes; running requests go back to
  the queue and are recomputed after the resume (a flush is allowed in this mode). Releases
  before the modes existed abort instead. Answer `{"status": "ok"}`.
- `POST /continue_generation {}`: undo the pause.
- `POST /update_weights_from_disk {"model_path", "flush_cache": true, "abort_all_requests": false,
  "weight_version"}`: load the folder's safetensors in place (immediately when paused, otherwise
  after the running requests). Answer `{"success", "message", "num_paused_requests"}`, HTTP 400
  when `success` is false (SGLang then rolls back to the weights it had).
- `POST /flush_cache`: drop the radix (prefix) cache; HTTP 400 while requests run.
- `POST /init_weights_update_group {"master_address", "master_port", "rank_offset", "world_size",
  "group_name", "backend"}`: the server's TP workers join ranks rank_offset + tp_rank of a torch
  group (see `collective.C10dGroup`); answers once joined, so it is sent from a thread while the
  trainer opens its rank 0. SGLang numbers workers by TP rank only: pipeline or data parallel
  servers would collide, so they are refused here.
- `POST /update_weights_from_distributed {"names", "dtypes", "shapes", "group_name",
  "flush_cache": true, "abort_all_requests": false, "weight_version"}`: the workers allocate each
  tensor (`getattr(torch, dtype)`, so dtypes are "bfloat16", "float32", ...), receive it by
  broadcast from rank 0 in that order, then `load_weights`. It answers after the last tensor, so it
  is sent from a thread while the trainer broadcasts (SGLang's own test does the same).
- `POST /destroy_weights_update_group {"group_name"}` when the sync closes.
- `POST /generate {"input_ids", "return_logprob": true, "logprob_start_len": s,
  "sampling_params": {"max_new_tokens": 1, "temperature": 1}}`: the probe's log-probs from
  `meta_info.input_token_logprobs`, one `[logprob, token_id, text]` per prompt token from s on
  (the first is null: no logprob before it). SGLang's log-probs are after temperature, hence 1.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Optional

from .base import WeightSync, WeightSyncError, post_json
from .collective import alongside, dtype_name, open_group, save_weights

CONTROL_TIMEOUT = 60.0  # seconds for a control route (pause, flush, probe); loads get --sync_timeout


class _SGLangSync(WeightSync):
    def _timeout(self) -> float:
        return min(CONTROL_TIMEOUT, self.cfg.sync_timeout)

    def _post(self, url: str, path: str, body: Optional[dict], what: str, *, timeout: Optional[float] = None) -> dict:
        answer = post_json(url, path, body, timeout=timeout or self._timeout(), what=what)
        if answer.get("success") is False:
            raise WeightSyncError(f"server {url} refused POST {path} ({what}): {answer.get('message')}. Training "
                                  "stops; the last checkpoint stays valid (--resume auto continues from it).")
        return answer

    def pause(self) -> None:
        for url in self.urls():
            self._post(url, "/pause_generation", {"mode": "retract"}, "pause generation")

    def resume(self) -> None:
        for url in self.urls():
            self._post(url, "/continue_generation", {}, "resume generation")

    def flush(self) -> None:
        for url in self.urls():
            self._post(url, "/flush_cache", None, "flush the prefix cache")

    def prompt_logprobs(self, url: str, ids: list[int], start: int) -> list[float]:
        body = {"input_ids": list(ids), "return_logprob": True, "logprob_start_len": start - 1, "stream": False,
                "sampling_params": {"max_new_tokens": 1, "temperature": 1.0}}
        answer = post_json(url, "/generate", body, timeout=self._timeout(), what="probe log-probs")
        want = list(ids[start:])
        try:
            tail = answer["meta_info"]["input_token_logprobs"][-len(want):]  # [[logprob, token_id, text], ...]
            if [int(e[1]) for e in tail] != want:
                raise ValueError("the token ids differ from the probe's")
            return [float(e[0]) for e in tail]
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise WeightSyncError(f"server {url}: POST /generate gave no usable meta_info.input_token_logprobs for the "
                                  f"probe ({type(e).__name__}: {e}); is it an SGLang server?") from None


class SGLangDiskSync(_SGLangSync):
    """Writes the policy's safetensors to the sync dir; each server loads them with /update_weights_from_disk."""

    name = "SGLang disk weight sync"

    def __init__(self, cfg, engine, model, tokenizer, *, sync_dir: Optional[Path] = None):
        super().__init__(cfg, engine, model, tokenizer, sync_dir=sync_dir)
        self.require_sync_dir("SGLang")

    def send(self, model, step: int) -> int:
        folder, written = save_weights(model, self.tokenizer, self.sync_dir, step)
        body = {"model_path": str(folder), "flush_cache": True, "abort_all_requests": False,
                "weight_version": f"step-{step}"}
        for url in self.urls():
            self._post(url, "/update_weights_from_disk", body, f"load the weights of step {step} from {folder}; the "
                       "server must read --sync_dir at that path", timeout=self.cfg.sync_timeout)
        return written


class SGLangNcclSync(_SGLangSync):
    """Broadcasts every parameter from the trainer (rank 0) to the servers' TP workers, one tensor at a time."""

    name = "SGLang NCCL weight sync"

    def __init__(self, cfg, engine, model, tokenizer, *, sync_dir: Optional[Path] = None):
        super().__init__(cfg, engine, model, tokenizer)
        self.group = None
        self.group_name = f"treepo-{uuid.uuid4().hex[:12]}"  # new per run: a server keeps a name until destroyed
        urls, ranks = self.urls(), cfg.nccl_server_ranks
        for url in urls:
            self._check_parallelism(url, ranks)
        self.world_size = 1 + len(urls) * ranks
        calls = {url: self._init_call(url, 1 + i * ranks) for i, url in enumerate(urls)}
        try:
            alongside(self._open_group, calls, timeout=cfg.sync_timeout, what="joining the weight-update group")
        except BaseException:
            self.close()
            raise

    def _open_group(self) -> None:
        self.group = open_group("c10d", self.cfg, self.world_size, self.group_name)

    def _init_call(self, url: str, rank_offset: int):
        c = self.cfg
        body = {"master_address": c.nccl_master_address, "master_port": c.nccl_master_port, "rank_offset": rank_offset,
                "world_size": self.world_size, "group_name": self.group_name, "backend": c.nccl_backend}
        return lambda: self._post(url, "/init_weights_update_group", body, "join the weight-update group at "
                                  f"{c.nccl_master_address}:{c.nccl_master_port} as ranks {rank_offset}..",
                                  timeout=c.sync_timeout)

    def _check_parallelism(self, url: str, ranks: int) -> None:
        try:
            info = post_json(url, "/get_server_info", None, timeout=self._timeout(), what="server info", method="GET")
        except WeightSyncError:
            return  # advisory only: the join itself reports an unreachable server
        tp, pp, dp = (info.get(k) for k in ("tp_size", "pp_size", "dp_size"))
        if (pp or 1) > 1 or (dp or 1) > 1:
            raise WeightSyncError(f"server {url} runs pp_size={pp} dp_size={dp}: SGLang's weight-update group numbers "
                                  "workers by TP rank only; run one server per data-parallel replica with pp_size 1, "
                                  "or use --weight_sync disk.")
        if tp is not None and tp != ranks:
            raise WeightSyncError(f"server {url} has {tp} tensor-parallel workers but --nccl_server_ranks is {ranks}: "
                                  f"pass --nccl_server_ranks {tp}.")

    def send(self, model, step: int) -> int:
        named = [(n, p) for n, p in model.named_parameters()]  # tied weights once; [*shape] in the policy's dtype
        body = {"names": [n for n, _ in named], "dtypes": [dtype_name(p) for _, p in named],
                "shapes": [list(p.shape) for _, p in named], "group_name": self.group_name, "flush_cache": True,
                "abort_all_requests": False, "weight_version": f"step-{step}"}
        calls = {url: (lambda url=url: self._post(url, "/update_weights_from_distributed", body,
                                                  f"receive the weights of step {step}", timeout=self.cfg.sync_timeout))
                 for url in self.urls()}
        return alongside(lambda: self.group.broadcast(named), calls, timeout=self.cfg.sync_timeout,
                         what=f"the weight broadcast of step {step}")

    def close(self) -> None:
        for url in self.urls():
            try:
                post_json(url, "/destroy_weights_update_group", {"group_name": self.group_name},
                          timeout=self._timeout(), what="leave the weight-update group")
            except WeightSyncError:
                pass  # a server that is gone has no group left to leave
        if self.group is not None:
            self.group.close()
            self.group = None
        self.release()
