"""One weight-sync interface for training with generation servers, and the fingerprint that checks it.

After every optimizer step the trainer calls `WeightSync.push(model, step)`, which

1. pauses generation on every server (where the server has such a route),
2. sends the new weights (`send`: a file the servers load, or tensors over a collective),
3. flushes every server's prefix cache: KV computed with the old weights must never be reused, and
   treepo's segment continuations lean on that cache,
4. resumes generation, and
5. checks a fingerprint: each server's log-probs of a fixed probe continuation must match the
   updated policy's within `sync_tolerance` (else `WeightSyncError`, naming the server).

The probe is fixed once, when the sync is built: a short prompt and the initial policy's greedy
continuation of `probe_tokens` tokens. Each server scores that continuation teacher-forced
(`prompt_logprobs`, per back-end); `remember(model)` before the update keeps the old policy's
scores, so every sync also reports how far the server sits from the old weights (`sync_gap_old`)
beside the new (`sync_gap`): a server that still served the old weights would show the reverse.

Back-ends subclass `WeightSync` and implement `send` (and, where the server has them, `pause`,
`resume`, `flush`, `prompt_logprobs`). A back-end that cannot run here says so when it is built.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import requests
import torch

from ...errors import ConfigError, ServerError

log = logging.getLogger(__name__)

PROBE_PROMPT = "Weight check. The sum of 12 and 7 is"


class WeightSyncError(ServerError):
    """A server refused a weight update, or serves other weights than the policy's after one.

    `status` is the HTTP status of a refused control request (None for other failures)."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


class WeightMismatch(WeightSyncError):
    """The fingerprint: a server answers, but with other weights than the policy's."""


def hold_sync_dir(folder: Path):
    """An exclusive lock on `folder/.treepo-sync.lock` for this run (an open file; close() releases it), or
    ConfigError when another live run holds it."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / ".treepo-sync.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ConfigError(f"sync_dir={str(folder)!r} is in use by another training run: give each run its own "
                          "--sync_dir (the default, OUT/weight_sync, is per run).") from None
    return handle


@dataclass
class Probe:
    """The fixed fingerprint: `prompt` ids and a `continuation` the servers score teacher-forced."""

    prompt: list[int]
    continuation: list[int]
    old: Optional[list[float]] = None  # the policy's log-probs of the continuation before the update

    @property
    def ids(self) -> list[int]:
        return self.prompt + self.continuation


@dataclass
class SyncReport:
    step: int
    seconds: float
    bytes_sent: int
    gaps: dict[str, float]  # server url -> max |server - policy| log-prob over the probe continuation
    gaps_old: dict[str, float] = field(default_factory=dict)  # the same against the policy before the update
    moved: Optional[float] = None  # max |policy after - policy before| on the probe: how far the update moved it

    def metrics(self) -> dict:
        row = {"sync_seconds": self.seconds, "sync_bytes": self.bytes_sent,
               "sync_gap": max(self.gaps.values()) if self.gaps else None}
        if self.gaps_old:
            row["sync_gap_old"] = min(self.gaps_old.values())
        if self.moved is not None:
            row["sync_policy_moved"] = self.moved
        return row


@torch.no_grad()
def policy_logprobs(model, ids: Sequence[int], start: int) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= start under `model` at temperature 1 (teacher-forced)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        logits = model(torch.tensor([list(ids)], device=device)).logits[0].float()  # [T, V]
    finally:
        model.train(was_training)
    logp = torch.log_softmax(logits[start - 1 : len(ids) - 1], -1)  # [T - start, V]: position t-1 predicts t
    target = torch.tensor(ids[start:], device=device)[:, None]  # [T - start, 1]
    return logp.gather(-1, target).squeeze(-1).tolist()


@torch.no_grad()
def make_probe(model, tokenizer, n_tokens: int) -> Probe:
    """The probe prompt and the policy's greedy continuation of `n_tokens` (EOS never ends it)."""
    prompt = tokenizer(PROBE_PROMPT, add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    ids = list(prompt)
    was_training = model.training
    model.eval()
    try:
        for _ in range(n_tokens):
            logits = model(torch.tensor([ids], device=device)).logits[0, -1].float()  # [V]
            eos = tokenizer.eos_token_id
            if eos is not None and n_tokens > 1:
                logits[eos] = -math.inf  # a continuation that keeps going scores every position
            ids.append(int(logits.argmax()))
    finally:
        model.train(was_training)
    return Probe(prompt=list(prompt), continuation=ids[len(prompt):])


def post_json(url: str, path: str, body: Optional[dict], *, timeout: float, what: str, method: str = "POST") -> dict:
    """One control request to a server; WeightSyncError (one line, naming the server and route) on any failure."""
    try:
        reply = requests.request(method, url.rstrip("/") + path, json=body, timeout=timeout)
    except requests.RequestException as e:
        raise WeightSyncError(f"server {url}: {method} {path} ({what}) failed: {type(e).__name__}: {e}. Training "
                              "stops; the last checkpoint stays valid (--resume auto continues from it).") from None
    if not reply.ok:
        detail = reply.text.strip().replace("\n", " ")[:300]
        raise WeightSyncError(f"server {url} refused {method} {path} ({what}): HTTP {reply.status_code} {detail}. "
                              "Training stops; the last checkpoint stays valid (--resume auto continues from it).",
                              status=reply.status_code)
    try:
        return reply.json() if reply.content else {}
    except ValueError:
        return {"text": reply.text}


class WeightSync:
    """Pushes the policy's weights to the engine's servers; see the module docstring."""

    name = "weight sync"

    def __init__(self, cfg, engine, model, tokenizer, *, sync_dir: Optional[Path] = None):
        self.cfg, self.engine, self.tokenizer = cfg, engine, tokenizer
        # where a disk back-end writes the weights: the run's folder (start_serving), else --sync_dir
        self.sync_dir = Path(sync_dir) if sync_dir else (Path(cfg.sync_dir).expanduser() if cfg.sync_dir else None)
        self.probe = make_probe(model, tokenizer, cfg.probe_tokens)
        self.reports: list[SyncReport] = []

    # -- the protocol the trainer calls -------------------------------------------------------
    def remember(self, model) -> None:
        """Before an update: the policy's probe scores, so the sync can show the server left them."""
        self.probe.old = policy_logprobs(model, self.probe.ids, len(self.probe.prompt))

    def push(self, model, step: int) -> SyncReport:
        """Send the model's weights to every server and check they serve them (see the module docstring)."""
        t0 = time.perf_counter()
        self.pause()
        try:
            sent = self.send(model, step)
            self.flush()
        except BaseException:
            try:
                self.resume()  # best effort: the send's error is the one to report
            except Exception as e:  # noqa: BLE001 - a second failure must not hide the first
                log.warning("resuming generation after a failed weight sync failed too: %s", e)
            raise
        self.resume()
        report = self.verify(model, step, bytes_sent=sent, seconds=time.perf_counter() - t0)
        self.reports.append(report)
        return report

    def verify(self, model, step: int, *, bytes_sent: int = 0, seconds: float = 0.0) -> SyncReport:
        """Every server's probe log-probs against the policy's; WeightSyncError beyond the tolerance."""
        start = len(self.probe.prompt)
        mine = policy_logprobs(model, self.probe.ids, start)
        gaps, gaps_old = {}, {}
        for url in self.urls():
            theirs = self.prompt_logprobs(url, self.probe.ids, start)
            if len(theirs) != len(mine) or not all(math.isfinite(x) for x in theirs):
                raise WeightSyncError(f"server {url} gave {len(theirs)} probe log-probs for {len(mine)} tokens after "
                                      f"the weight sync at step {step}; it cannot be checked, so training stops (the "
                                      "last checkpoint stays valid).")
            gaps[url] = max(abs(a - b) for a, b in zip(theirs, mine))
            if self.probe.old is not None:
                gaps_old[url] = max(abs(a - b) for a, b in zip(theirs, self.probe.old))
        moved = None if self.probe.old is None else max(abs(a - b) for a, b in zip(mine, self.probe.old))
        report = SyncReport(step, seconds, bytes_sent, gaps, gaps_old, moved)
        for url, gap in gaps.items():
            if gap > self.cfg.sync_tolerance:
                old = f"; {gaps_old[url]:.3g} from the weights before the update" if url in gaps_old else ""
                raise WeightMismatch(
                    f"server {url} serves other weights than the policy after the {self.name} at step {step}: its "
                    f"log-probs of the probe differ from the policy's by {gap:.3g} nats (tolerance "
                    f"--sync_tolerance {self.cfg.sync_tolerance:g}){old}. Training stops; the last checkpoint stays "
                    "valid (--resume auto continues from it once the server loads the weights).")
        return report

    held = None  # the sync folder's lock (hold_sync_dir), released by close()

    def close(self) -> None:
        self.release()

    def release(self) -> None:
        if self.held is not None:
            self.held.close()
            self.held = None

    def require_sync_dir(self, servers: str) -> Path:
        """The folder a disk back-end writes to; WeightSyncError when there is none."""
        if self.sync_dir is None:
            raise WeightSyncError(f"--weight_sync disk needs a --sync_dir that every {servers} server reads at the "
                                  "same path.")
        return self.sync_dir

    # -- what back-ends implement -------------------------------------------------------------
    def urls(self) -> list[str]:
        return [s.url for s in self.engine.pool.servers]

    def send(self, model, step: int) -> int:
        """Deliver the weights to every server; returns the bytes sent (or written)."""
        raise NotImplementedError

    def pause(self) -> None:
        """Stop the servers from starting new requests (none by default: treepo's own rollouts are finished)."""

    def resume(self) -> None:
        """Undo `pause`."""

    def flush(self) -> None:
        """Drop every server's prefix cache (a back-end whose send already does this leaves it empty)."""

    def prompt_logprobs(self, url: str, ids: list[int], start: int) -> list[float]:
        """log p(ids[t] | ids[:t]) for t >= start as the server at `url` computes it.

        Generic: one single-token completion per position, the wanted token forced by a logit
        bias; servers that report log-probs from the raw logits (llama.cpp, vLLM's default
        raw_logprobs) report the token's unbiased log-prob. Back-ends with a prompt-logprobs
        route override this.
        """
        return self.engine.forced_logprobs(url, ids, start)
