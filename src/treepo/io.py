"""Atomic file output: a reader (or a crash) never sees a half-written file.

Each file is written to a temporary name in the same folder and renamed over the target.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Optional

from .errors import InputError


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_output_dir(path: str | Path, what: str = "out") -> Path:
    """Fail early, before any work, if `path` cannot become a folder we write into."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what}={str(path)!r} is a file: pass a folder for the outputs.")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{what}={str(path)!r}: cannot create or write it ({existing} is not a writable folder).")
    return path


@contextlib.contextmanager
def staged_dir(path: str | Path) -> Iterator[Path]:
    """Write a set of files into a temporary folder; on success move them all into `path`.

    An error while writing leaves `path` untouched (no partial set of outputs next to older ones).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield stage
        apply_umask(stage)  # what moves out of the 0700 stage keeps the modes a plain write gives
        path.mkdir(exist_ok=True)
        for item in stage.iterdir():
            os.replace(item, path / item.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


_UMASK_LOCK = threading.Lock()
_UMASK: Optional[int] = None


def _umask() -> int:
    """The process umask, read once: os.umask can only be read by setting it, so a lock keeps other
    threads from creating files while it is briefly 0."""
    global _UMASK
    with _UMASK_LOCK:
        if _UMASK is None:
            _UMASK = os.umask(0o077)  # if another thread does create a file meanwhile, it is private, not open
            os.umask(_UMASK)
        return _UMASK


def apply_umask(root: str | Path) -> None:
    """Give `root` and everything under it the modes a plain mkdir / open would (0777 / 0666 minus the umask).

    tempfile.mkdtemp / mkstemp (and some writers, e.g. safetensors) create private 0700 / 0600 entries;
    outputs moved into place from them would stay unreadable to anyone else on shared storage.
    """
    root = Path(root)
    mask = _umask()
    dir_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir():  # keep setgid (inherited from a shared group folder), as mkdir would
            os.chmod(path, dir_mode | (path.stat().st_mode & stat.S_ISGID))
        else:
            os.chmod(path, file_mode)


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> None:
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def utf8_problem(path: str | Path) -> Optional[str]:
    """None when the file is UTF-8 text (a leading byte-order mark is fine), else what is wrong and the fix.

    Read in chunks, so a large dataset file is checked without holding it in memory.
    """
    path = Path(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            data = decoder.getstate()[0] + chunk  # a character cut by the last chunk's end is completed here
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                line += data.count(b"\n", 0, e.start)
                fixed = path.with_name(f"{path.stem}.utf8{path.suffix}")
                return (f"not UTF-8 text (byte 0x{data[e.start:e.start + 1].hex()} on line {line}): save it as UTF-8, "
                        f"e.g. iconv -f latin1 -t utf-8 {path} > {fixed}")
            if not chunk:
                return None
            line += chunk.count(b"\n")
