"""The SGLang and vLLM weight syncs (disk, and NCCL's protocol over gloo) against in-process fake servers."""

from __future__ import annotations

import ctypes
import pickle
import pickletools
import re
import socket
import sys
import time
import types
from types import SimpleNamespace

import pytest
import torch

import tiny
from fake_weight_server import FakeWeightServer
from treepo.config import WeightSyncConfig
from treepo.engines.weight_sync.base import WeightSyncError
from treepo.engines.weight_sync.collective import VLLM_UNIQUE_ID_CLASS, vllm_unique_id_pickle
from treepo.engines.weight_sync.sglang import SGLangDiskSync, SGLangNcclSync
from treepo.engines.weight_sync.vllm import VLLMDiskSync, VLLMNcclSync

CLASSES = {("sglang", "disk"): SGLangDiskSync, ("sglang", "nccl"): SGLangNcclSync,
           ("vllm", "disk"): VLLMDiskSync, ("vllm", "nccl"): VLLMNcclSync}
COMBOS = sorted(CLASSES)
IDS = [f"{k}-{t}" for k, t in COMBOS]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(kind, transport, policy, fakes, tmp_path, **cfg):
    cfg = WeightSyncConfig(weight_sync=transport, server_kind=kind, probe_tokens=4, sync_timeout=8.0,
                           nccl_master_port=free_port(), nccl_backend="gloo", **cfg)
    engine = SimpleNamespace(pool=SimpleNamespace(servers=[SimpleNamespace(url=f.url) for f in fakes]),
                             model_name="fake-model")
    return CLASSES[kind, transport](cfg, engine, policy, tiny.tokenizer(), sync_dir=tmp_path / "sync")


@torch.no_grad()
def optimizer_step(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.3)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture()
def fakes():
    made = []

    def make(kind, **kw):
        made.append(FakeWeightServer(kind, tiny.model(seed=0), **kw))
        return made[-1]

    yield make
    for f in made:
        f.stop()


@pytest.mark.parametrize("kind,transport", COMBOS, ids=IDS)
def test_push_leaves_the_server_serving_the_policy(kind, transport, fakes, tmp_path):
    fake = fakes(kind)
    policy = tiny.model(seed=0)
    sync = build(kind, transport, policy, [fake], tmp_path)
    try:
        for step in (1, 2):
            sync.remember(policy)
            optimizer_step(policy, seed=step)
            report = sync.push(policy, step)
            assert same_weights(policy, fake.model)
            row = report.metrics()
            assert row["sync_gap"] < 1e-4 and row["sync_gap_old"] > 0.5, row
            assert row["sync_bytes"] > 0
            assert fake.events[-4:] == ["pause", "update", "flush", "resume"]
            assert not fake.cache_stale and fake.unpaused_updates == 0 and not fake.paused
        assert fake.loads == 2
        if transport == "disk":
            assert [p.name for p in (tmp_path / "sync").iterdir()] == ["step-00000002"]  # only the newest
    finally:
        sync.close()
    if kind == "vllm" and transport == "nccl":
        assert fake.routes[-6:] == ["/pause", "/start_weight_update", "/update_weights", "/finish_weight_update",
                                    "/reset_prefix_cache", "/resume"]
        assert fake.bodies["/init_weight_transfer_engine"]["init_info"]["rank_offset"] == 1
    if kind == "sglang" and transport == "nccl":
        assert "/destroy_weights_update_group" in fake.routes
        assert fake.bodies["/init_weights_update_group"]["world_size"] == 2


@pytest.mark.parametrize("kind,transport", COMBOS, ids=IDS)
def test_a_refused_update_names_the_server(kind, transport, fakes, tmp_path):
    fake = fakes(kind, mode="refuse")
    policy = tiny.model(seed=0)
    sync = build(kind, transport, policy, [fake], tmp_path)
    try:
        optimizer_step(policy)
        t0 = time.monotonic()
        with pytest.raises(WeightSyncError, match=fake.url) as err:
            sync.push(policy, 1)
        assert "refuse" in str(err.value) and "\n" not in str(err.value)
        assert time.monotonic() - t0 < 5
        assert not fake.paused  # resumed even though the update failed
    finally:
        sync.close()


@pytest.mark.parametrize("kind,transport", COMBOS, ids=IDS)
def test_a_server_that_pretends_is_caught_by_the_fingerprint(kind, transport, fakes, tmp_path):
    fake = fakes(kind, mode="pretend")
    policy = tiny.model(seed=0)
    sync = build(kind, transport, policy, [fake], tmp_path)
    try:
        sync.remember(policy)
        optimizer_step(policy)
        with pytest.raises(WeightSyncError, match=f"server {fake.url} serves other weights") as err:
            sync.push(policy, 1)
        old = re.search(r"; (\S+) from the weights before the update", str(err.value))
        assert old and float(old.group(1)) < 1e-4  # it still serves the old ones
    finally:
        sync.close()


@pytest.mark.parametrize("kind,transport", COMBOS, ids=IDS)
def test_a_dead_server_fails_fast(kind, transport, fakes, tmp_path):
    fake = fakes(kind)
    policy = tiny.model(seed=0)
    sync = build(kind, transport, policy, [fake], tmp_path)
    fake.stop()
    t0 = time.monotonic()
    try:
        with pytest.raises(WeightSyncError, match=fake.url):
            sync.push(policy, 1)
    finally:
        sync.close()
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("kind", ["sglang", "vllm"])
def test_a_dead_server_fails_the_group_join_fast(kind, fakes, tmp_path):
    fake = fakes(kind)
    fake.stop()
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match=fake.url):
        build(kind, "nccl", tiny.model(seed=0), [fake], tmp_path)
    assert time.monotonic() - t0 < 5


def test_vllm_worker_count_must_match_nccl_server_ranks(fakes, tmp_path):
    fake = fakes("vllm", workers=2)
    with pytest.raises(WeightSyncError, match="pass --nccl_server_ranks 2"):
        build("vllm", "nccl", tiny.model(seed=0), [fake], tmp_path)


def test_vllm_without_dev_mode_says_how_to_start_it(fakes, tmp_path):
    fake = fakes("vllm", dev_mode=False)
    policy = tiny.model(seed=0)
    sync = build("vllm", "disk", policy, [fake], tmp_path)
    with pytest.raises(WeightSyncError, match="VLLM_SERVER_DEV_MODE=1"):
        sync.push(policy, 1)


def test_vllm_nccl_unique_id_pickles_as_vllms_own_class(monkeypatch):
    """The trainer publishes the NCCL id as vLLM's StatelessProcessGroup.broadcast_obj would: unpickled on the
    server it must be vLLM's ncclUniqueId with the same 128 bytes."""

    class ncclUniqueId(ctypes.Structure):  # vLLM's layout (pynccl_wrapper)
        _fields_ = [("internal", ctypes.c_byte * 128)]

    module = types.ModuleType(VLLM_UNIQUE_ID_CLASS[0])
    module.ncclUniqueId = ncclUniqueId
    parts = VLLM_UNIQUE_ID_CLASS[0].split(".")
    for i in range(1, len(parts)):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    monkeypatch.setitem(sys.modules, VLLM_UNIQUE_ID_CLASS[0], module)
    raw = bytes(range(256))[::2]
    got = pickle.loads(vllm_unique_id_pickle(raw))
    assert isinstance(got, ncclUniqueId) and ctypes.string_at(ctypes.byref(got), 128) == raw
    module.ncclUniqueId.__module__, module.ncclUniqueId.__qualname__ = VLLM_UNIQUE_ID_CLASS
    ref = ncclUniqueId()
    ctypes.memmove(ctypes.byref(ref), raw, 128)
    assert pickletools.optimize(pickle.dumps(ref, protocol=3)) == vllm_unique_id_pickle(raw)  # what vLLM's rank 0 sends


@pytest.mark.parametrize("kind", ["sglang", "vllm"])
def test_disk_sync_updates_every_server(kind, fakes, tmp_path):
    servers = [fakes(kind), fakes(kind)]
    policy = tiny.model(seed=0)
    sync = build(kind, "disk", policy, servers, tmp_path)
    sync.remember(policy)
    optimizer_step(policy)
    report = sync.push(policy, 3)
    assert set(report.gaps) == {s.url for s in servers} and max(report.gaps.values()) < 1e-4
    assert all(same_weights(policy, s.model) and s.events == ["pause", "update", "flush", "resume"] for s in servers)


def test_treepo_train_against_an_external_vllm_server_pushes_every_update(tmp_path):
    """`treepo train --engine server --server-url URL` with a (fake) vLLM server that starts on other weights:
    the first check fails, so the policy is pushed before step 1; every update is pushed, checked and
    flushed before the next rollout; each step and round samples with its own seeds."""
    import json

    import tiny
    from safetensors.torch import load_file
    from treepo.config import EngineConfig, RewardConfig, SamplerConfig, TrainConfig, WeightSyncConfig
    from treepo.train.trainer import run_train

    model_dir = tiny.save_model_dir(tmp_path / "model")
    fake = FakeWeightServer("vllm", tiny.model("llama", seed=7), tokenizer=tiny.tokenizer())
    try:
        out = tmp_path / "run"
        run_train(EngineConfig(model=str(model_dir), engine="server", server_url=[fake.url], server_concurrency=2),
                  SamplerConfig(width=4, depth=2, segment_len=6, seed=3),
                  RewardConfig(reward="toy_rewards:letter_share"),
                  TrainConfig(prompts=str(tiny.write_prompts(tmp_path / "p.jsonl", 8)), num_prompts=8, steps=2,
                              prompts_per_step=2, learning_rate=1e-2, out=str(out), tensorboard=False,
                              checkpoint_every=0),
                  sync_cfg=WeightSyncConfig(sync_dir=str(tmp_path / "sync")))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]
        assert fake.loads == 3  # the initial push (the server ran other weights), then one per update
        assert fake.generated_while_stale == 0  # no completion came from an unflushed cache
        for r in rows:
            assert r["sync_gap"] < 1e-4 and r["sync_gap_old"] > 10 * r["sync_gap"]
            assert r["engine_logprob_gap"] < 1e-4  # the rollout came from the weights the policy had
        final = tiny.model("llama")
        final.load_state_dict(load_file(str(out / "model" / "model.safetensors")))
        assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), fake.model.state_dict().values()))
        assert len(set(fake.seeds)) == len(fake.seeds)  # no node's draw repeats across steps
    finally:
        fake.stop()


def test_two_runs_cannot_share_a_sync_folder(tmp_path):
    from treepo.engines.weight_sync.base import hold_sync_dir
    from treepo.errors import ConfigError

    first = hold_sync_dir(tmp_path / "sync")
    with pytest.raises(ConfigError, match="in use by another training run"):
        hold_sync_dir(tmp_path / "sync")
    first.close()
    hold_sync_dir(tmp_path / "sync").close()  # released with its run


def test_resample_rounds_against_a_server_draw_with_their_own_seeds(tmp_path):
    """Groups whose rewards all tie are dropped and refilled: each resample round samples with fresh seeds
    (a server draws from (seed, group, node), and each round numbers its groups from 0 again)."""
    import json

    import tiny
    from treepo.config import EngineConfig, RewardConfig, SamplerConfig, TrainConfig, WeightSyncConfig
    from treepo.train.trainer import run_train

    model_dir = tiny.save_model_dir(tmp_path / "model")
    fake = FakeWeightServer("vllm", tiny.model("llama"), tokenizer=tiny.tokenizer())
    try:
        out = tmp_path / "run"
        run_train(EngineConfig(model=str(model_dir), engine="server", server_url=[fake.url], server_concurrency=2),
                  SamplerConfig(width=2, depth=2, segment_len=4, seed=3),
                  RewardConfig(reward="toy_rewards:constant"),  # every group ties: dropped, resampled
                  TrainConfig(prompts=str(tiny.write_prompts(tmp_path / "p.jsonl", 4)), num_prompts=4, steps=1,
                              prompts_per_step=2, max_resample_rounds=2, out=str(out), tensorboard=False,
                              checkpoint_every=0),
                  sync_cfg=WeightSyncConfig(sync_dir=str(tmp_path / "sync")))
        row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        assert row["resample_rounds"] == 2 and row["prompts_rolled"] == 6
        assert len(fake.seeds) > 0 and len(set(fake.seeds)) == len(fake.seeds)
    finally:
        fake.stop()
