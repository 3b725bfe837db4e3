"""Write a policy as a float GGUF that llama.cpp's llama-server loads (weight sync, `--launch_server`).

The policy is saved as a Hugging Face folder (safetensors, config, tokenizer) and converted by
llama.cpp's own `convert_hf_to_gguf.py` of the same llama.cpp revision as the server binary (both
come from scripts/build_llama_server.sh): no hand-written tensor mapping. `f32` keeps the policy's
numbers (log-probs agree to about 1e-4 nats with a float32 policy); `f16` halves the file.
The file appears whole or not at all (written beside, then renamed).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ...errors import InputError
from ..local_server import llama_server_dir


def converter_script() -> Path:
    script = llama_server_dir() / "convert" / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise InputError(f"llama.cpp's convert_hf_to_gguf.py is not at {script}: run "
                         "`bash scripts/build_llama_server.sh`, which keeps it beside llama-server.")
    return script


def write_gguf(model, tokenizer, out: Path, outtype: str = "f32", *, timeout: float = 600.0) -> int:
    """Write `model` (+ `tokenizer`) to the GGUF file `out`; returns its size in bytes."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    script = converter_script()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".gguf-") as tmp:
        folder = Path(tmp) / "hf"
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one bar per sync would flood the training log
        try:
            model.save_pretrained(folder, safe_serialization=True)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        tokenizer.save_pretrained(folder)
        part = Path(tmp) / out.name
        command = [sys.executable, str(script), str(folder), "--outtype", outtype, "--outfile", str(part)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"})
        except subprocess.TimeoutExpired:
            raise InputError(f"convert_hf_to_gguf.py took over {timeout:.0f} s for {out.name}") from None
        if done.returncode != 0 or not part.is_file():
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise InputError(f"convert_hf_to_gguf.py could not write a GGUF of this model ({tail}). llama.cpp "
                             "converts the architectures and tokenizers it knows (Llama, Qwen2/3, Mistral, ...; "
                             "a BPE tokenizer it recognises); use --server-url with vLLM or SGLang for others.")
        os.replace(part, out)
    return out.stat().st_size
