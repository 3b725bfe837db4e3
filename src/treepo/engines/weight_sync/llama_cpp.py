"""Weight sync to llama.cpp's llama-server: write a float GGUF, restart the server treepo started.

llama-server has no route that loads new weights into a running model, so the back-end needs the
server process itself (`--launch_server`): `send` writes the policy as `step-NNNNNN.gguf` under
the sync folder (`gguf.write_gguf`), restarts the server on the same port with it, and deletes the
previous file. A restarted server starts with empty KV and prompt caches, so nothing computed with
the old weights survives (`flush` has nothing left to do).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ...errors import ServerError
from ..local_server import LlamaCppServer
from .base import WeightSync, WeightSyncError
from .gguf import write_gguf


class LlamaCppRestartSync(WeightSync):
    name = "llama-server restart"

    def __init__(self, cfg, engine, model, tokenizer, *, server: LlamaCppServer, sync_dir: Path):
        super().__init__(cfg, engine, model, tokenizer, sync_dir=sync_dir)
        self.server = server
        self.server.startup_timeout = cfg.sync_timeout
        for stale in self.sync_dir.glob("step-*.gguf"):  # an interrupted run's last weights: not this server's
            if stale != self.server.gguf:
                stale.unlink(missing_ok=True)
        for scratch in self.sync_dir.glob(".gguf-*"):  # an interrupted conversion's scratch folder
            shutil.rmtree(scratch, ignore_errors=True)

    def send(self, model, step: int) -> int:
        path = self.sync_dir / f"step-{step:06d}.gguf"
        size = write_gguf(model, self.tokenizer, path, self.cfg.gguf_type, timeout=self.cfg.sync_timeout)
        previous = self.server.gguf
        try:
            self.server.restart(path)
        except ServerError as e:
            raise WeightSyncError(f"llama-server at {self.server.url} did not come back with the weights of step "
                                  f"{step} ({e}). Training stops; the last checkpoint stays valid (--resume auto "
                                  "continues from it).") from None
        if previous != path and previous.parent == self.sync_dir:
            previous.unlink(missing_ok=True)  # only the newest weights are kept
        return size
