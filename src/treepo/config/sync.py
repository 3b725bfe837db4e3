"""WeightSyncConfig: how `treepo train --engine server` pushes new weights to the servers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .base import _help, _require


@dataclass
class WeightSyncConfig:
    """How `treepo train --engine server` pushes the policy's weights to the servers after every update."""

    weight_sync: Literal["disk", "nccl"] = field(
        default="disk",
        metadata=_help(
            "'disk': write the new weights where the servers read them and have them load it (SGLang "
            "update_weights_from_disk, vLLM reload_weights, llama-server restarted on a GGUF); 'nccl': broadcast "
            "the tensors over an NCCL group that the servers join (vLLM, SGLang; GPU clusters)."
        ),
    )
    server_kind: Literal["auto", "llama.cpp", "sglang", "vllm"] = field(
        default="auto",
        metadata=_help("Which server the weights go to; 'auto' = from the `owned_by` of its GET /v1/models."),
    )
    sync_dir: str = field(
        default="",
        metadata=_help(
            "--weight_sync disk: folder the new weights are written to, which every server must be able to read "
            "at the same path; empty = OUT/weight_sync. Only the newest weights are kept."
        ),
    )
    gguf_type: Literal["f32", "f16"] = field(
        default="f32",
        metadata=_help("llama.cpp: the GGUF float type written for the server; f32 matches the policy's numbers."),
    )
    sync_tolerance: float = field(
        default=0.1,
        metadata=_help(
            "Largest |server - policy| log-prob (nats) over the probe after a sync; beyond it training stops "
            "(the server serves other weights). Raise it for servers in lower precision (bf16: about 0.2)."
        ),
    )
    probe_tokens: int = field(
        default=8, metadata=_help("Length of the fixed probe continuation every sync is checked on.")
    )
    sync_timeout: float = field(
        default=600.0, metadata=_help("Seconds a server may take to load new weights before training stops.")
    )
    nccl_master_address: str = field(
        default="127.0.0.1",
        metadata=_help("--weight_sync nccl: address of this trainer that the servers' workers connect to."),
    )
    nccl_master_port: int = field(
        default=29600, metadata=_help("--weight_sync nccl: port of the weight-update group's rendezvous.")
    )
    nccl_server_ranks: int = field(
        default=1,
        metadata=_help("--weight_sync nccl: GPU workers of each server (its tensor x pipeline parallel size)."),
    )
    nccl_backend: Literal["nccl", "gloo"] = field(
        default="nccl",
        metadata=_help("--weight_sync nccl: the collective backend ('gloo' only for tests against CPU fakes)."),
    )

    def __post_init__(self) -> None:
        _require(self.sync_tolerance > 0, f"sync_tolerance={self.sync_tolerance}: must be > 0 nats.")
        _require(self.probe_tokens >= 1, f"probe_tokens={self.probe_tokens}: must be >= 1.")
        _require(self.sync_timeout > 0, f"sync_timeout={self.sync_timeout}: must be > 0 seconds.")
        _require(1 <= self.nccl_master_port <= 65535, f"nccl_master_port={self.nccl_master_port}: not a port number.")
        _require(self.nccl_server_ranks >= 1, f"nccl_server_ranks={self.nccl_server_ranks}: must be >= 1.")
        _require(not (self.weight_sync == "nccl" and self.server_kind == "llama.cpp"),
                 "weight_sync='nccl' with server_kind='llama.cpp': llama-server has no collective weight route; "
                 "use --weight_sync disk.")
