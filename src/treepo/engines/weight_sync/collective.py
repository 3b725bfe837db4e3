"""What the SGLang and vLLM back-ends share: the folder of safetensors a disk sync writes, and the
trainer's side of an NCCL sync (rank 0 of a group the servers' GPU workers join).

`save_weights` writes `save_pretrained` (safetensors, config, tokenizer) into a fresh temporary
folder under the sync dir, renames it to `step-NNNNNNNN` (a server never sees a half-written
folder) and removes the older ones: only the newest weights are kept.

The broadcast has two rendezvous protocols, because the two servers build their side differently:

- `C10dGroup` (SGLang). SGLang's `init_weights_update_group` calls its `init_custom_process_group`
  (read in sglang main: `python/sglang/srt/utils`, `model_executor/weight_updater.py`):
  torch's `rendezvous("tcp://addr:port", rank, world_size)` (a TCPStore client), then
  `PrefixStore(group_name, store)`, then torch's private `_new_process_group_helper`, which keys the
  backend under `PrefixStore(f"{group_name}/")` and `PrefixStore("cuda/" | "cpu/")` (read in torch
  2.13 `distributed_c10d.py`). The trainer builds the same key chain here from public classes
  (`TCPStore`, `PrefixStore`, `ProcessGroupNCCL` / `ProcessGroupGloo`), so torch's default
  process group is neither needed nor touched (a trainer under accelerate keeps its own; the
  private helper would try to split a device-bound default group). Each tensor then goes out as one
  `broadcast` from rank 0, in the order of the names the server was given.
- `PyNcclGroup` (vLLM). vLLM's NCCL weight-transfer engine (`vllm/distributed/weight_transfer/
  nccl_engine.py`, `vllm/distributed/utils.py` StatelessProcessGroup, `device_communicators/
  pynccl.py`; vllm main, nccl_engine.py @71364e12) joins with a *stateless* group: a bare TCPStore, rank 0 publishes the
  NCCL unique id as `pickle.dumps(ncclUniqueId)` under `broadcast_from/0/0`, every rank calls
  `ncclCommInitRank`, then one warm-up all_reduce of a float32 zero; weights arrive as raw
  `ncclBroadcast`s (not torch's ProcessGroupNCCL, whose unique-id exchange differs). So the trainer
  must speak that protocol: it does, through ctypes on the libnccl that torch loaded, without vLLM.

Verified here (CPU, no GPU): the c10d key chain and broadcasts against a fake that joins exactly as
SGLang does (torch's `rendezvous` + `_new_process_group_helper`, gloo), and the unique-id pickle
against a stand-in `ncclUniqueId` class. Not verified: real NCCL (either protocol) on GPUs, the
ctypes signatures against a live libnccl, and NCCL version skew between trainer and servers.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import shutil
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist

from .base import WeightSyncError

Named = Iterable[tuple[str, torch.Tensor]]
log = logging.getLogger(__name__)


def dtype_name(t: torch.Tensor) -> str:
    """'bfloat16', 'float32', ...: both servers rebuild the dtype with getattr(torch, name)."""
    return str(t.dtype).removeprefix("torch.")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def save_weights(model, tokenizer, sync_dir: Path, step: int) -> tuple[Path, int]:
    """(the folder, bytes written): the model's safetensors, config and tokenizer, all-or-nothing, newest only."""
    sync_dir = Path(sync_dir).resolve()  # the servers get an absolute path
    sync_dir.mkdir(parents=True, exist_ok=True)
    final, tmp = sync_dir / f"step-{step:08d}", sync_dir / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        getattr(model, "module", model).save_pretrained(tmp)  # safetensors (transformers >= 4.35 default, 5 only)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WeightSyncError(f"cannot write the weights to {sync_dir} ({type(e).__name__}: {e}); pass a writable "
                              "--sync_dir that every server can read at the same path.") from None
    for old in sync_dir.glob("step-*"):
        if old != final and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    if not any(final.glob("*.safetensors")):
        raise WeightSyncError(f"save_pretrained wrote no .safetensors file to {final}; the servers load only those.")
    return final, sum(f.stat().st_size for f in final.iterdir() if f.is_file())


class C10dGroup:
    """Rank 0 of a torch c10d group keyed like `init_custom_process_group` (see the module docstring)."""

    def __init__(self, host: str, port: int, world_size: int, group_name: str, backend: str, timeout: float):
        td = timedelta(seconds=timeout)
        # blocks until all world_size ranks have connected (or the timeout)
        self.store = dist.TCPStore(host, port, world_size, True, timeout=td)
        keyed = dist.PrefixStore(f"{group_name}/", dist.PrefixStore(group_name, self.store))
        if backend == "gloo":
            self.device = torch.device("cpu")
            self.pg = dist.ProcessGroupGloo(dist.PrefixStore("cpu/", keyed), 0, world_size, td)
        else:
            self.device = torch.device("cuda", torch.cuda.current_device())
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = td
            options.is_high_priority_stream = False
            self.pg = dist.ProcessGroupNCCL(dist.PrefixStore("cuda/", keyed), 0, world_size, options)

    busy = False  # a broadcast is under way (or stuck: a server that refused never receives it)

    def broadcast(self, named: Named) -> int:
        """Each tensor once from rank 0, in order; returns the bytes broadcast."""
        self.busy, sent = True, 0
        for _, t in named:
            t = t.detach().to(self.device).contiguous()
            opts = dist.BroadcastOptions()
            opts.rootRank, opts.rootTensor = 0, 0
            self.pg.broadcast([t], opts).wait()
            sent += _nbytes(t)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.busy = False
        return sent

    def close(self) -> None:
        if self.busy:  # shutting down (or dropping the group) would wait for the stuck broadcast: its thread
            return     # holds the group and frees it when the broadcast ends at its own timeout
        for stop in ("shutdown", "abort"):
            try:
                getattr(self.pg, stop)()
                break
            except Exception:  # not every backend and torch version has both
                continue
        self.pg = self.store = None


# -- vLLM's stateless NCCL group ----------------------------------------------------------------
VLLM_UNIQUE_ID_CLASS = ("vllm.distributed.device_communicators.pynccl_wrapper", "ncclUniqueId")
_NCCL_DTYPES = {torch.int8: 0, torch.uint8: 1, torch.bool: 1, torch.int32: 2, torch.int64: 4, torch.float16: 6,
                torch.float32: 7, torch.float64: 8, torch.bfloat16: 9}  # ncclDataType_t


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * 128)]  # ncclUniqueId: 128 opaque bytes


def vllm_unique_id_pickle(raw: bytes) -> bytes:
    """What `pickle.dumps(<vLLM's ncclUniqueId>)` produces, built without importing vLLM: a ctypes
    structure unpickles through `_ctypes._unpickle(cls, (state_dict, raw_bytes))`."""
    if len(raw) != 128:
        raise ValueError(f"an NCCL unique id has 128 bytes, not {len(raw)}")
    module, name = VLLM_UNIQUE_ID_CLASS
    return (b"\x80\x03" + b"c_ctypes\n_unpickle\n" + f"c{module}\n{name}\n".encode() + b"}"
            + b"C" + bytes([128]) + raw + b"\x86\x86R.")  # (cls, ({}, raw)) -> REDUCE


def _libnccl() -> ctypes.CDLL:
    path = os.environ.get("VLLM_NCCL_SO_PATH") or "libnccl.so.2"  # the one torch loaded, by soname
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        raise WeightSyncError(f"--weight_sync nccl to vLLM needs libnccl ({path}: {e}); install torch with CUDA, "
                              "or set VLLM_NCCL_SO_PATH to libnccl.so.2.") from None
    vp, i, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    lib.ncclGetErrorString.restype = ctypes.c_char_p
    lib.ncclGetUniqueId.argtypes = [ctypes.POINTER(_UniqueId)]
    lib.ncclCommInitRank.argtypes = [ctypes.POINTER(vp), i, _UniqueId, i]
    lib.ncclAllReduce.argtypes = [vp, vp, sz, i, i, vp, vp]
    lib.ncclBroadcast.argtypes = [vp, vp, sz, i, i, vp, vp]
    lib.ncclCommDestroy.argtypes = [vp]
    return lib


class PyNcclGroup:
    """Rank 0 of vLLM's StatelessProcessGroup + PyNcclCommunicator (see the module docstring)."""

    def __init__(self, host: str, port: int, world_size: int, timeout: float):
        self.lib = _libnccl()
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.store = dist.TCPStore(host, port, world_size, True, timeout=timedelta(seconds=timeout))
        uid = _UniqueId()
        self._check(self.lib.ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
        self.store.set("broadcast_from/0/0", vllm_unique_id_pickle(ctypes.string_at(ctypes.byref(uid), 128)))
        self.comm = ctypes.c_void_p()
        with torch.cuda.device(self.device):
            self._check(self.lib.ncclCommInitRank(ctypes.byref(self.comm), world_size, uid, 0), "ncclCommInitRank")
            warm = torch.zeros(1, device=self.device)  # vLLM's warm-up all_reduce, matched on every rank
            self._check(self.lib.ncclAllReduce(warm.data_ptr(), warm.data_ptr(), 1, 7, 0, self.comm,
                                               self._stream()), "ncclAllReduce")
            torch.cuda.synchronize(self.device)

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def _check(self, result: int, what: str) -> None:
        if result != 0:
            raise WeightSyncError(f"{what} failed: {self.lib.ncclGetErrorString(result).decode()} (NCCL error "
                                  f"{result}); check that trainer and servers reach each other and run one NCCL.")

    busy = False

    def broadcast(self, named: Named) -> int:
        self.busy, sent = True, 0
        with torch.cuda.device(self.device):
            for name, t in named:
                t = t.detach().to(self.device).contiguous()
                if t.dtype not in _NCCL_DTYPES:
                    raise WeightSyncError(f"{name}: dtype {t.dtype} has no NCCL type")
                self._check(self.lib.ncclBroadcast(t.data_ptr(), t.data_ptr(), t.numel(), _NCCL_DTYPES[t.dtype], 0,
                                                   self.comm, self._stream()), "ncclBroadcast")
                sent += _nbytes(t)
            torch.cuda.synchronize(self.device)
        self.busy = False
        return sent

    def close(self) -> None:
        if self.busy:  # destroying under a stuck broadcast would hang; NCCL's own timeout ends it
            return
        if getattr(self, "comm", None):
            self.lib.ncclCommDestroy(self.comm)
        self.comm = self.store = None


# -- running the trainer's half beside the servers' HTTP calls ----------------------------------
# Halves that `alongside` gave up on, still blocked in a torch call (a TCPStore waiting for its ranks, a
# gloo or NCCL wait) with the GIL released, each with the time by which that call has surely timed out.
# Such a call must not return while the interpreter finalises: re-taking the GIL then ends the thread
# with pthread_exit, whose forced unwinding through pybind11's noexcept gil_scoped_release destructor
# calls std::terminate ("terminate called without an active exception", exit 134) after the program
# has finished its work, by chance. `_join_left_halves` (atexit, before finalisation) waits them out.
_LEFT: dict[threading.Thread, float] = {}
_LEFT_LOCK = threading.Lock()
EXIT_GRACE = 5.0  # seconds past a half's own timeout that exit waits for it


def _left_deadline(timeout: float) -> float:
    # a c10d join may wait `timeout` for the ranks (TCPStore), then as long again for gloo's connections
    return time.monotonic() + 2 * timeout + EXIT_GRACE


@atexit.register
def _join_left_halves() -> None:
    """Wait (bounded) for every half still blocked in a torch call: see `_LEFT`."""
    with _LEFT_LOCK:
        left = list(_LEFT.items())
    for thread, deadline in left:
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            log.warning("weight sync: %s is still blocked in a collective call at exit", thread.name)


def alongside(work: Callable[[], object], calls: dict[str, Callable[[], object]], *, timeout: float, what: str):
    """`work()` (the trainer's half of a rendezvous or broadcast) while every server's blocking HTTP call in
    `calls` (url -> fn) runs in its own thread; returns work's result once all are done.

    Raises WeightSyncError at the first failure (a server's refusal names it), or when `timeout` passes:
    a half that has not returned by then is not waited for here but left to its own timeout (its thread is
    a daemon), and the interpreter's exit waits for it (`_join_left_halves`), never finalising under it."""
    done = threading.Event()
    results: dict[str, tuple[bool, object]] = {}
    lock = threading.Lock()

    def run(key: str, fn: Callable[[], object]) -> None:
        try:
            out = (True, fn())
        except BaseException as e:  # reported to the caller below
            out = (False, e)
        with lock:
            results[key] = out
        done.set()
        with _LEFT_LOCK:
            _LEFT.pop(threading.current_thread(), None)

    jobs = {**calls, "": work}
    threads = {key: threading.Thread(target=run, args=(key, fn), daemon=True,
                                     name=f"treepo-sync {key or 'trainer'}") for key, fn in jobs.items()}
    deadline = _left_deadline(timeout)
    with _LEFT_LOCK:
        _LEFT.update((t, deadline) for t in threads.values())  # registered first: `run` removes its own
    for thread in threads.values():
        thread.start()
    deadline = time.monotonic() + timeout
    while True:
        with lock:
            failed = [(k, v) for k, (ok, v) in results.items() if not ok]
            finished = len(results) == len(jobs)
        if failed:
            key, err = next(((k, e) for k, e in failed if k), failed[0])  # a server's own answer names the fault
            if isinstance(err, WeightSyncError):
                raise err
            who = f"server {key}" if key else f"the trainer's side ({', '.join(calls)})"
            raise WeightSyncError(f"{what} failed on {who}: {type(err).__name__}: {err}. Check --nccl_master_address"
                                  " / --nccl_master_port are reachable from every server's workers.") from None
        if finished:
            return results[""][1]
        left = deadline - time.monotonic()
        if left <= 0:
            waiting = [k or "the trainer" for k in jobs if k not in results]
            raise WeightSyncError(f"{what} did not finish within --sync_timeout {timeout:g} s (waiting for "
                                  f"{', '.join(waiting)}); training stops (the last checkpoint stays valid).")
        done.wait(min(left, 0.2))
        done.clear()


def open_group(protocol: str, cfg, world_size: int, group_name: Optional[str] = None):
    """The trainer's group: 'c10d' (SGLang, and vLLM over gloo for CPU fakes) or 'pynccl' (vLLM over NCCL)."""
    host, port, t = cfg.nccl_master_address, cfg.nccl_master_port, float(cfg.sync_timeout)
    if cfg.nccl_backend == "nccl" and not torch.cuda.is_available():
        raise WeightSyncError("--weight_sync nccl needs a CUDA GPU on the trainer (none is visible); use --weight_sync "
                              "disk, or --nccl_backend gloo against a CPU test server.")
    if protocol == "pynccl" and cfg.nccl_backend == "nccl":
        return PyNcclGroup(host, port, world_size, t)
    return C10dGroup(host, port, world_size, group_name or "treepo_weights", cfg.nccl_backend, t)
