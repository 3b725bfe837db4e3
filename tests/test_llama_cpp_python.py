"""The server engine's text dialect against `python -m llama_cpp.server` on loopback (SmolLM2 Q4_1 GGUF).

llama-cpp-python's server takes text prompts and names sampled tokens by their strings; the token-id
server the other tests use is llama.cpp's C++ llama-server (tests/test_llama_server.py).

Skipped when llama-cpp-python's server is not installed, unless TREEPO_REQUIRE_SERVER=1 (CI and the
README's test command set it after `scripts/setup.sh --server` built it): then a missing server fails.
The server runs the Q4_1 weights with llama.cpp's quantised matmuls (activations rounded to 8 bits);
the embedded engine runs the same weights dequantised to float32. Log-probs therefore agree to a few
hundredths of a nat, and greedy paths agree until two candidate tokens are that close, then part.
"""

from __future__ import annotations


import pytest
import torch

from treepo.config import EngineConfig, SamplerConfig
from treepo.engines.local_server import LocalLlamaServer, llama_cpp_server_available
from treepo.engines.loading import load_engine, smollm2_gguf
from treepo.prompts import load_task, render
from treepo.rollout.sampler import TreeSampler

from real_servers import leak_guards, require

require(llama_cpp_server_available(), "llama-cpp-python's server is not installed", "bash scripts/setup.sh --server")

pytestmark = pytest.mark.slow
SYSTEM = "Reason step by step, then answer in \\boxed{}."
EOS = 2


MODULE_SERVERS: set[int] = set()  # pids of the module-scoped server, which outlives single tests by design


# Set up before (so torn down after) `server`: by then every server this module started is gone.
no_server_outlives_the_module, no_server_outlives_its_test = leak_guards("llama_cpp.server", MODULE_SERVERS)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # The with-block stops it (process group) on teardown, whatever the tests did; a failed start kills it.
    with LocalLlamaServer(smollm2_gguf(), log_path=tmp_path_factory.mktemp("llama") / "server.log") as s:
        MODULE_SERVERS.add(s.process.pid)
        yield s


@pytest.fixture(scope="module")
def embedded():
    return load_engine(EngineConfig(temperature=0.0))


def prompt_ids(tokenizer, n: int) -> list[list[int]]:
    prompts = load_task("chain_sum", n, seed=0, task_args={"min_terms": 2, "max_terms": 2, "max_digits": 2})
    return [render(p, tokenizer, SYSTEM) for p in prompts]


def forward_logprobs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log_softmax(logits) over the vocabulary at each response position [R, V], teacher-forced."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, -1)


def test_tree_rollout_through_llama_cpp_server(server, embedded):
    eng = load_engine(EngineConfig(engine="server", server_url=[server.url], server_concurrency=4), seed=0)
    assert eng.dialect == "text"  # llama-cpp-python takes text prompts; the ids are checked, not trusted
    prompts = prompt_ids(eng.tokenizer, 2)
    result = TreeSampler(SamplerConfig(width=4, depth=3, segment_len=16, seed=1), eng).rollout(prompts)
    report = eng.server_report()
    stats = report["servers"][0]
    segments = [n for t in result.trees for n in t.nodes.values() if n.id]
    assert [len(t.leaves) for t in result.trees] == [4, 4]
    assert stats["requests"] == len(segments) and stats["failures"] == 0
    assert stats["completion_tokens"] == sum(len(n.token_ids) for n in segments)
    if report["retokenized_contexts"] == 0:  # then the server saw exactly the tree's token counts
        contexts = sum(len(t.prompt_ids) + t.nodes[n.id[:-1]].start + len(t.nodes[n.id[:-1]].token_ids)
                       if len(n.id) > 1 else len(t.prompt_ids) for t in result.trees for n in t.nodes.values() if n.id)
        assert stats["prompt_tokens"] == contexts
    # The sampled ids are right: the embedded model, teacher-forced on them, gives the server's log-probs.
    diffs = []
    for tree in result.trees:
        for traj in tree.trajectories():
            ref = forward_logprobs(embedded.model, tree.prompt_ids, traj.token_ids)
            ref = ref.gather(-1, torch.tensor(traj.token_ids)[:, None]).squeeze(-1)
            diffs += (torch.tensor(traj.logprobs) - ref).abs().tolist()
    diffs.sort()
    print(f"sampled tokens: |server - embedded| log-prob median {diffs[len(diffs) // 2]:.4f}, max {diffs[-1]:.3f}; "
          f"retokenized contexts {report['retokenized_contexts']}")
    assert diffs[len(diffs) // 2] < 0.08 and diffs[-1] < 1.0  # wrong ids would be off by nats
    eng.close()


def test_greedy_leaves_agree_with_the_embedded_engine_until_a_near_tie(server, embedded):
    eng = load_engine(EngineConfig(engine="server", server_url=[server.url], temperature=0.0), seed=0)
    prompts = prompt_ids(eng.tokenizer, 6)
    cfg = SamplerConfig(width=2, depth=3, segment_len=16, seed=1, answer_policy="none", rep_count=0)
    remote = TreeSampler(cfg, eng).rollout(prompts).trees
    local = TreeSampler(cfg, embedded).rollout(prompts).trees
    agree, splits = 0, []
    for r_tree, l_tree in zip(remote, local):
        r_leaves = [t.token_ids for t in r_tree.trajectories()]
        l_leaves = [t.token_ids[:-1] if t.token_ids[-1:] == [EOS] else t.token_ids for t in l_tree.trajectories()]
        assert all(leaf == r_leaves[0] for leaf in r_leaves)  # greedy: a tree's leaves are one path
        r, lo = r_leaves[0], l_leaves[0]
        if r == lo:
            agree += 1
            continue
        k = next((i for i, (a, b) in enumerate(zip(r, lo)) if a != b), min(len(r), len(lo)))
        if k == min(len(r), len(lo)):
            continue  # one stopped (EOS) where the other went on: same tokens as far as both go
        # Where they part, the embedded model ranks the server's token within a near-tie of its own.
        ref = forward_logprobs(embedded.model, r_tree.prompt_ids, r[: k + 1])[k]
        gap = float(ref[lo[k]] - ref[r[k]])
        splits.append((k, round(gap, 3)))
        assert 0 <= gap < 0.5, (k, gap)
    print(f"greedy: {agree}/{len(prompts)} paths identical; where they part (position, embedded gap in nats): {splits}")
    assert agree + len(splits) == len(prompts)
    eng.close()
