"""A Ray run (num_cpus=2) of the tree agent loop inside verl's real v1 agent loop worker, with fake generation
servers behind verl's real server client and load balancer, TransferQueue in between, and the trainer
mode's advantage step at the end. No GPU, no download: the servers are scripted Ray actors.

Checked: exactly n rows per prompt (the tree's leaves, each repeated for its particles); every request
carries the token ids of its parent's context plus the parent's segment (prefixes reused, never
re-tokenised); all requests of one tree reach one server (sticky routing); the tree metadata reaches
the advantage step, whose advantages equal treepo's on the same trees; the adaptive shape is learnt
across steps in one worker; a server that dies mid-tree ends every session of its prompt with an error
(the prompt delivers no rows), no hang.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid

import numpy as np
import pytest
import ray
import transfer_queue as tq
from omegaconf import OmegaConf
from tensordict import TensorDict
from conftest import compose
from transfer_queue import KVBatchMeta
from verl.utils import tensordict_utils as tu
from verl.workers.rollout.replica import TokenOutput

import treepo.integrations.verl.plugin  # noqa: F401
from treepo.integrations.rows import row_advantages
from treepo.integrations.verl.settings import check_config
from treepo.integrations.verl.trainer import _column
from treepo.integrations.verl.tree_rows import trees_from_rows

WIDTH, SEGMENT, DEPTH = 4, 4, 3
EOS = 2  # the tiny tokenizer's </s>


@ray.remote
class FakeServer:
    """Token-ids-in, token-ids-out like verl's vLLM server: max_tokens honoured, EOS returned as the last id."""

    def __init__(self, name: str, die_after: int = 0):
        self.name, self.die_after, self.log = name, die_after, []

    async def generate(self, prompt_ids, sampling_params, request_id, image_data=None, video_data=None, **kwargs):
        if self.die_after and len(self.log) >= self.die_after:
            os._exit(1)  # the server process dies in the middle of a tree
        await asyncio.sleep(0.05)  # requests overlap, so the balancer's in-flight counts spread the trees
        m = int(sampling_params["max_tokens"])
        h = hashlib.sha256(repr(list(prompt_ids)).encode()).digest()
        tokens = [10 + h[i] % 40 for i in range(m)]  # a function of the context: distinct contexts, distinct segments
        if h[31] % 4 == 0 and len(prompt_ids) > 20:  # some paths end early at EOS
            tokens = tokens[: 1 + h[30] % m][:-1] + [EOS]
        self.log.append((list(prompt_ids), tokens, dict(sampling_params)))
        return TokenOutput(token_ids=tokens, log_probs=[-0.5] * len(tokens), stop_reason="completed",
                           extra_fields={"global_steps": 0, "num_cached_tokens": 0})

    def calls(self):
        return self.log


@ray.remote
class FakeReward:
    """verl's reward loop worker interface: a score per trajectory (1 if its response holds token 17)."""

    async def compute_score(self, data):
        return {"reward_score": float(17 in data.batch["responses"][0].tolist()), "reward_extra_info": {}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
    from tiny import save_model_dir
    from transformers import AutoTokenizer

    path = save_model_dir(tmp_path_factory.mktemp("tiny"))
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    tok.save_pretrained(path)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}})
    # TransferQueue's controller and storage unit take one CPU each; everything else here asks for none
    tq.init(OmegaConf.create({"backend": {"SimpleStorage": {"num_data_storage_units": 1}}}))
    yield str(path)
    tq.close()
    ray.shutdown()


def _config(model_path: str, *extra: str):
    return compose([f"actor_rollout_ref.model.path={model_path}", "trainer.use_v1=True", "trainer.v1.trainer_mode=treepo",
                    "actor_rollout_ref.rollout.agent.default_agent_loop=treepo_tree", "algorithm.adv_estimator=treepo",
                    "actor_rollout_ref.rollout.name=vllm", f"actor_rollout_ref.rollout.n={WIDTH}",
                    "actor_rollout_ref.rollout.prompt_length=64", f"actor_rollout_ref.rollout.response_length={SEGMENT * DEPTH}",
                    "actor_rollout_ref.rollout.calculate_log_probs=True", f"+treepo.segment_len={SEGMENT}",
                    "+treepo.branching=2", "+treepo.answer_policy=none", *extra])


def _worker(config, servers: dict):
    """verl's real v1 agent loop worker (a Ray actor) on verl's real server client and load balancer."""
    from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopWorkerTQ
    from verl.workers.rollout.llm_server import LLMServerClient
    from verl.workers.rollout.router import get_router_handle

    client = LLMServerClient(config, load_balancer_handle=get_router_handle(servers=servers))
    return AgentLoopWorkerTQ.options(num_cpus=0).remote(config, client, None, [FakeReward.options(num_cpus=0).remote()])


def _rollout(config, servers: dict, prompts: list[str], timeout: float = 240, worker=None, step: int = 1):
    """verl's v1 rollout of `prompts` (what the sync trainer submits for one step); (uids, row keys, statuses)."""
    worker = worker or _worker(config, servers)
    uids = [str(uuid.uuid4()) for _ in prompts]
    batch = tu.get_tensordict({
        "raw_prompt": np.array([[{"role": "user", "content": p}] for p in prompts], dtype=object),
        "uid": np.array(uids, dtype=object), "index": np.arange(len(prompts)),
        "data_source": np.array(["toy"] * len(prompts), dtype=object)})
    tu.assign_non_tensor_data(batch, "global_steps", step)
    tq.kv_batch_put(keys=uids, partition_id="train", tags=[{"is_prompt": True, "status": "pending"} for _ in uids])
    ray.get(worker.generate_sequences.remote(batch))
    deadline = time.time() + timeout
    while True:
        tags = tq.kv_list("train").get("train", {})
        status = {u: tags.get(u, {}).get("status") for u in uids}
        if all(s in ("finished", "failure") for s in status.values()):
            break
        assert time.time() < deadline, f"the rollout did not end in {timeout} s: {status}"
        time.sleep(0.5)
    keys = sorted(k for k in tags if k.split("_")[0] in status and k not in status)
    return uids, keys, status


def _advantage_step(config, keys):
    """The trainer mode's advantage step (verl's own _compute_advantage inside) on these rows."""
    from treepo.integrations.verl.trainer import TreePOTrainer

    # what the actor's old-log-prob step writes before verl's advantage step (no GPU actor here: the rollout's own)
    logps = tq.kv_batch_get(keys=keys, partition_id="train", select_fields=["rollout_log_probs"])["rollout_log_probs"]
    tq.kv_batch_put(keys=keys, partition_id="train", fields=TensorDict({"old_log_probs": logps}, batch_size=len(keys)))
    trainer = object.__new__(TreePOTrainer)  # the step needs only the config (no GPU workers)
    trainer.config, trainer.treepo = config, check_config(config, where="test")
    metrics: dict = {}
    meta = trainer._compute_advantage(KVBatchMeta(partition_id="train", keys=keys, tags=[{}] * len(keys)), metrics)
    return meta, metrics


def test_a_tree_rollout_through_verls_worker_client_and_balancer(cluster):
    config = _config(cluster, "+treepo.shape=fixed", "+treepo.init_divergence=2")
    servers = {"s0": FakeServer.options(num_cpus=0).remote("s0"), "s1": FakeServer.options(num_cpus=0).remote("s1")}
    uids, keys, status = _rollout(config, servers, ["count the r in strawberry", "2 + 2 = ?", "name a prime", "hi"])
    assert set(status.values()) == {"finished"}
    rows = tq.kv_batch_get(keys=keys, partition_id="train", select_fields=["uid", "extra_fields", "responses", "prompts",
                                                                            "rm_scores", "rollout_log_probs"])
    row_uids, fields = _column(rows, "uid"), _column(rows, "extra_fields")
    responses = [r.tolist() for r in rows["responses"].unbind()]
    prompts = {u: rows["prompts"].unbind()[i].tolist() for i, u in enumerate(row_uids)}
    for u in uids:  # exactly n rows per prompt, session i holding row i of the tree
        assert sorted(f["treepo_row"] for uu, f in zip(row_uids, fields) if uu == u) == list(range(WIDTH))
    trees, positions, incomplete = trees_from_rows(row_uids, fields, responses)
    assert incomplete == []
    assert all(t.group_size == WIDTH for t in trees) and any(len(t.leaves) > 1 for t in trees)
    for tree, rows_ in zip(trees, positions):  # the trees' own accounting rode along, and prefixes were shared
        assert fields[rows_[0]]["treepo_tree_decoded_tokens"] == tree.decoded_tokens < tree.particle_tokens

    calls = {name: ray.get(s.calls.remote()) for name, s in servers.items()}
    served = {}  # prompt uid -> servers its requests reached
    known = {tuple(p) for p in prompts.values()}
    every = sorted((c for log in calls.values() for c in log), key=lambda c: len(c[0]))
    for ids, out, params in every:
        assert params["max_tokens"] <= SEGMENT and params["logprobs"] is True
        assert tuple(ids) in known, "a request whose context is not a prompt or a parent's context + its segment"
        known.add(tuple(ids) + tuple(out))
    for name, log in calls.items():
        for ids, _, _ in log:
            owner = [u for u, p in prompts.items() if ids[: len(p)] == p]
            assert len(owner) == 1
            served.setdefault(owner[0], set()).add(name)
    assert all(len(s) == 1 for s in served.values()), f"a tree's requests went to several servers: {served}"
    assert len(set().union(*served.values())) == 2, "the balancer did not spread the trees over both servers"

    meta, metrics = _advantage_step(config, keys)
    adv = tq.kv_batch_get(keys=keys, partition_id="train", select_fields=["advantages"])["advantages"]
    got = [a.tolist() for a in adv.unbind()]
    scores = [float(s.sum()) for s in rows["rm_scores"].unbind()]
    order = [i for rows_ in positions for i in rows_]
    expected = row_advantages(trees, [scores[i] for i in order], "unbiased", "scale")
    for i, e in zip(order, expected):
        assert np.allclose(got[i], e, atol=1e-6)
    assert metrics["treepo/decoded_tokens"] < metrics["treepo/particle_tokens"]
    assert metrics["treepo/distinct_leaves_per_group"] > 1


def test_the_adaptive_shape_is_learnt_across_steps_in_the_worker(cluster):
    """Step 1 samples independently (no lengths seen); step 2's trees all grow the one shape the worker chose."""
    config = _config(cluster, "treepo.segment_len=2", "+treepo.depth=6", "+treepo.min_segment_len=2")  # adaptive (the default): budget 12 tokens
    servers = {"s0": FakeServer.options(num_cpus=0).remote("s0")}
    worker = _worker(config, servers)
    prompts = ["a", "bb", "ccc", "dddd", "eeeee", "ffffff"]
    shapes = []
    for step in (1, 2):
        uids, keys, status = _rollout(config, servers, [f"{p} {step}" for p in prompts], worker=worker, step=step)
        assert set(status.values()) == {"finished"}
        fields = _column(tq.kv_batch_get(keys=keys, partition_id="train", select_fields=["extra_fields"]), "extra_fields")
        shapes.append({(f["treepo_tree_segment_len"], f["treepo_tree_root_fanout"]) for f in fields})
    assert shapes[0] == {(2, WIDTH)}  # independent sampling, in the config's segments
    assert len(shapes[1]) == 1 and shapes[1] != shapes[0]  # one shape for the step, learnt: a tree that forks


def test_the_trainer_mode_is_verls_sync_trainer(cluster):
    """Constructed for real: the start-up check passes, and verl's base class sees a sync trainer (on-policy replay
    buffer), not an async one, though trainer.v1.trainer_mode=treepo."""
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer, ReplayBufferAsync

    from treepo.integrations.verl.trainer import TreePOTrainer

    trainer = TreePOTrainer(_config(cluster))
    assert trainer.trainer_mode == "sync" and trainer.treepo.sampler.width == WIDTH
    assert isinstance(trainer.replay_buffer, ReplayBuffer) and not isinstance(trainer.replay_buffer, ReplayBufferAsync)


def test_a_server_that_dies_mid_tree_fails_the_prompt_not_hangs(cluster):
    config = _config(cluster, "+treepo.shape=fixed", "+treepo.init_divergence=2")
    servers = {"s0": FakeServer.options(num_cpus=0).remote("dying", die_after=3)}
    uids, keys, status = _rollout(config, servers, ["what is 3 * 7", "say yes"], timeout=120)
    assert set(status.values()) == {"failure"}  # every session of both prompts ended (with the tree's error)
    assert keys == []  # and none delivered a row of a broken tree (the advantage step refuses partial trees:
    # tests/verl_plugin/test_verl_estimator.py::test_rows_of_a_broken_tree_are_refused)
