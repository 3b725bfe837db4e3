"""A training run's metrics: one JSON row per step in `metrics.jsonl`, and TensorBoard under `tb/`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from .. import io

log = logging.getLogger(__name__)


class MetricsLog:
    """Appends rows to `OUT/metrics.jsonl` (and TensorBoard scalars); only the main process writes."""

    def __init__(self, out: Path, *, main: bool, tensorboard: bool):
        self.out, self.main, self.tensorboard = out, main, tensorboard
        self._file = None
        self._path: Optional[Path] = None
        self.tb = None

    def open(self, resume_step: Optional[int]) -> list[dict]:
        """Start the log; on resume keep the rows up to `resume_step` (later steps are redone) and return them."""
        path = self.out / "metrics.jsonl"
        rows = [r for r in read_rows(path) if r.get("step", 0) <= resume_step] if resume_step is not None else []
        if not self.main:
            return rows
        self._path = path
        if rows:
            io.write_jsonl(path, rows)
        else:  # the file appears with the first row: a run stopped before it leaves no empty metrics.jsonl
            path.unlink(missing_ok=True)
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("tensorboard is not installed: metrics go to metrics.jsonl only (pip install tensorboard)")
            else:
                self.tb = SummaryWriter(str(self.out / "tb"), purge_step=resume_step + 1 if resume_step else None)
        return rows

    def write(self, row: dict) -> None:
        if self._path is None:
            return
        if self._file is None:
            self._file = open(self._path, "a", encoding="utf-8")
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step" and value is not None:
                    self.tb.add_scalar(key, value, row["step"])
            self.tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._path = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def read_rows(path: Path) -> list[dict]:
    """metrics.jsonl rows; a line cut short by a kill is skipped."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
