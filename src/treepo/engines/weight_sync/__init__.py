"""Weight sync: push the policy's weights to generation servers after every update.

`base` holds the interface and the fingerprint check; the back-ends are `llama_cpp` (restart a
llama-server treepo started, on a float GGUF written by `gguf`), `sglang` and `vllm` (disk and
NCCL routes), with `collective` the trainer's side of an NCCL broadcast. `build_weight_sync`
picks one from the config and the server's kind.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import ConfigError
from .base import SyncReport, WeightSync, WeightSyncError

__all__ = ["SyncReport", "WeightSync", "WeightSyncError", "build_weight_sync"]


def build_weight_sync(cfg, engine, model, tokenizer, *, sync_dir: Path, launched=None) -> WeightSync:
    """The back-end for `cfg` (a WeightSyncConfig) and the engine's servers; `launched` = the LlamaCppServer
    treepo started (--launch_server), if any."""
    kind = cfg.server_kind if cfg.server_kind != "auto" else ("llama.cpp" if launched is not None else engine.server_kind)
    if launched is not None and kind != "llama.cpp":
        raise ConfigError(f"server_kind={kind!r} with --launch_server: the server treepo launches is llama-server; "
                          "drop --server_kind (or pass llama.cpp), or give --server-url for an SGLang or vLLM server.")
    if kind == "llama.cpp":
        if launched is None:
            raise ConfigError("llama-server cannot load new weights over HTTP: pass --launch_server (and no "
                              "--server-url) so that treepo starts it and restarts it with each update's weights.")
        if cfg.weight_sync != "disk":
            raise ConfigError("weight_sync='nccl' with llama-server: it has no collective weight route; use "
                              "--weight_sync disk.")
        from .llama_cpp import LlamaCppRestartSync

        return LlamaCppRestartSync(cfg, engine, model, tokenizer, server=launched, sync_dir=sync_dir)
    if kind in ("sglang", "vllm"):
        if kind == "sglang":
            from .sglang import SGLangDiskSync as Disk, SGLangNcclSync as Nccl
        else:
            from .vllm import VLLMDiskSync as Disk, VLLMNcclSync as Nccl
        cls = Disk if cfg.weight_sync == "disk" else Nccl
        return cls(cfg, engine, model, tokenizer, sync_dir=sync_dir)
    raise ConfigError(f"the server is {kind!r} (GET /v1/models owned_by), which has no weight-update route treepo "
                      "knows: pass --server_kind sglang|vllm if it is one of those, or train with --launch_server "
                      "(llama-server) or the embedded engine.")
