"""The server engine against a real token-id server: llama.cpp's C++ `llama-server` on loopback.

The server (built by scripts/build_llama_server.sh from the llama-cpp-python 0.3.36 sdist's
vendor/llama.cpp) runs the default model's Q4_1 GGUF with 4 slots and continuous batching; prompts
go out as token ids and each sampled token's id and log-prob come back. It runs llama.cpp's
quantised matmuls, the embedded engine the same weights dequantised to float32: log-probs agree to
a few hundredths of a nat, and greedy paths agree until two candidates are that close, then part.
No assertion depends on which token the server samples (its draws differ between processors).

Skipped when llama-server is not built, unless TREEPO_REQUIRE_SERVER=1 (CI and the README's test
command, after `scripts/setup.sh --server` built it): then a missing server fails.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch

from treepo.cli import main
from treepo.config import EngineConfig, RolloutConfig, SamplerConfig
from treepo.engines.local_server import LlamaCppServer, llama_server_binary
from treepo.engines.loading import load_engine, smollm2_gguf
from treepo.errors import ServerError
from treepo.prompts import load_task, render
from treepo.rollout.job import run_rollout
from treepo.rollout.sampler import TreeSampler

from real_servers import leak_guards, require

require(llama_server_binary() is not None, "llama-server is not built", "bash scripts/build_llama_server.sh")

pytestmark = pytest.mark.slow
SYSTEM = "Reason step by step, then answer in \\boxed{}."
EOS = 2
MODULE_SERVERS: set[int] = set()


no_server_outlives_the_module, no_server_outlives_its_test = leak_guards("llama-server", MODULE_SERVERS)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LlamaCppServer(smollm2_gguf(), parallel=4, threads=1, model_name="smollm2",
                        log_path=tmp_path_factory.mktemp("llama-server") / "server.log") as s:
        MODULE_SERVERS.add(s.process.pid)
        yield s


@pytest.fixture(scope="module")
def embedded():
    return load_engine(EngineConfig(temperature=0.0))


def prompt_ids(tokenizer, n: int) -> list[list[int]]:
    prompts = load_task("chain_sum", n, seed=0, task_args={"min_terms": 2, "max_terms": 2, "max_digits": 2})
    return [render(p, tokenizer, SYSTEM) for p in prompts]


def teacher_forced(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log p(response[t] | prompt + response[:t]) under the embedded model [R]."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def test_tree_rollout_sends_token_ids_and_reads_back_ids_and_logprobs(server, embedded):
    eng = load_engine(EngineConfig(engine="server", server_url=[server.url], server_concurrency=4), seed=0)
    assert (eng.dialect, eng.server_kind, eng.max_context) == ("token_ids", "llama.cpp", 2048)
    prompts = prompt_ids(eng.tokenizer, 2)
    result = TreeSampler(SamplerConfig(width=4, depth=3, segment_len=16, seed=1), eng).rollout(prompts)
    report = eng.server_report()
    stats = report["servers"][0]
    segments = [n for t in result.trees for n in t.nodes.values() if n.id]
    assert [t.group_size for t in result.trees] == [4, 4]
    assert report["retokenized_contexts"] == 0 and report["unmappable_tokens"] == 0
    assert stats["requests"] == len(segments) and stats["failures"] == 0
    assert stats["completion_tokens"] == sum(len(n.token_ids) for n in segments)
    # The server saw exactly the tree's contexts, and took shared prefixes from its slots' caches.
    contexts = sum(len(t.prompt_ids) + t.nodes[n.id[:-1]].start + len(t.nodes[n.id[:-1]].token_ids)
                   if len(n.id) > 1 else len(t.prompt_ids) for t in result.trees for n in t.nodes.values() if n.id)
    assert stats["prompt_tokens"] == contexts
    assert stats["cached_prompt_tokens"] > 0
    # The sampled ids are right: the embedded model, teacher-forced on them, gives the server's log-probs.
    diffs, eos_leaves = [], 0
    for tree in result.trees:
        for traj in tree.trajectories():
            ref = teacher_forced(embedded.model, tree.prompt_ids, traj.token_ids)
            diffs += (torch.tensor(traj.logprobs) - ref).abs().tolist()
            eos_leaves += traj.token_ids[-1] == EOS
    diffs.sort()
    print(f"|server - embedded| log-prob median {diffs[len(diffs) // 2]:.4f}, max {diffs[-1]:.3f}; "
          f"{stats['cached_prompt_tokens']}/{stats['prompt_tokens']} prompt tokens from the cache; "
          f"{eos_leaves} leaves ended in EOS")
    assert diffs[len(diffs) // 2] < 0.08 and diffs[-1] < 1.0  # wrong ids would be off by nats
    eng.close()


def test_forced_logprobs_score_a_fixed_continuation_as_the_model_does(server, embedded):
    eng = load_engine(EngineConfig(engine="server", server_url=[server.url]), seed=0)
    prompt = prompt_ids(eng.tokenizer, 1)[0]
    # The snowman and the accented letters are split over byte tokens: llama-server lists no log-prob for a
    # token its text ends mid-character, so those come from its top log-probs at that position.
    continuation = eng.tokenizer("The answer is \\boxed{42}. Zebra ☃ naïve", add_special_tokens=False)["input_ids"]
    theirs = eng.forced_logprobs(server.url, prompt + continuation, len(prompt))
    mine = teacher_forced(embedded.model, prompt, continuation)
    gaps = (torch.tensor(theirs) - mine).abs()
    print(f"forced log-probs {[round(x, 2) for x in theirs]}; |server - embedded| max {gaps.max():.3f}")
    assert len(theirs) == len(continuation)
    assert float(gaps.median()) < 0.1 and float(gaps.max()) < 0.6  # Q4_1 numerics; the bias would add nats
    assert min(theirs) < -3  # unlikely tokens keep their low log-prob: the bias does not show
    pieces = [eng.tokenizer.decode(continuation[: k + 1]) for k in range(len(continuation))]
    assert any(p.endswith("\ufffd") for p in pieces)  # some token ends mid-character ...
    assert eng.recovered_logprobs >= 1  # ... and its log-prob was found all the same
    eng.close()


def test_greedy_leaves_agree_with_the_embedded_engine_until_a_near_tie(server, embedded):
    eng = load_engine(EngineConfig(engine="server", server_url=[server.url], temperature=0.0), seed=0)
    prompts = prompt_ids(eng.tokenizer, 4)
    cfg = SamplerConfig(width=2, depth=3, segment_len=16, seed=1, answer_policy="none", rep_count=0)
    remote = TreeSampler(cfg, eng).rollout(prompts).trees
    local = TreeSampler(cfg, embedded).rollout(prompts).trees
    agree, splits = 0, []
    for r_tree, l_tree in zip(remote, local):
        r_leaves = [t.token_ids for t in r_tree.trajectories()]
        assert all(leaf == r_leaves[0] for leaf in r_leaves)  # greedy: a tree's leaves are one path
        r, lo = r_leaves[0], next(l_tree.trajectories()).token_ids  # both keep EOS as their last id
        if r == lo:
            agree += 1
            continue
        k = next((i for i, (a, b) in enumerate(zip(r, lo)) if a != b), min(len(r), len(lo)))
        assert k < min(len(r), len(lo))  # they part at a token, never by one dropping EOS
        ref = teacher_forced(embedded.model, r_tree.prompt_ids, r[: k + 1])  # [k + 1]
        with torch.inference_mode():
            logits = embedded.model(torch.tensor([r_tree.prompt_ids + r[:k]])).logits[0, -1].float()
        gap = float(torch.log_softmax(logits, -1)[lo[k]] - ref[k])
        splits.append((k, round(gap, 3)))
        assert 0 <= gap < 0.5, (k, gap)
    print(f"greedy: {agree}/{len(prompts)} paths identical; where they part (position, gap in nats): {splits}")
    eng.close()


def test_killing_the_server_mid_rollout_is_an_error_and_loses_nothing_silently(tmp_path):
    doomed = LlamaCppServer(smollm2_gguf(), parallel=2, threads=1, log_path=tmp_path / "doomed.log")
    eng = load_engine(EngineConfig(engine="server", server_url=[doomed.url], server_retries=2,
                                   server_concurrency=2), seed=0)
    delivered: list[tuple[int, int]] = []
    generate = eng.generate

    def recording(requests):
        outputs = generate(requests)
        delivered.append((len(requests), len(outputs)))
        return outputs

    eng.generate = recording

    def kill_after_some_answers():
        while eng.pool.report()[0]["requests"] < 5 and doomed.process.poll() is None:
            threading.Event().wait(0.05)
        doomed.kill()

    killer = threading.Thread(target=kill_after_some_answers, daemon=True)
    killer.start()
    out = tmp_path / "run"
    try:
        with pytest.raises(ServerError) as failure:
            run_rollout(EngineConfig(engine="server", server_url=[doomed.url]),
                        SamplerConfig(width=4, depth=4, segment_len=16, seed=2),
                        RolloutConfig(task="chain_sum", num_prompts=2, out=str(out)), engine=eng)
    finally:
        doomed.kill()
        killer.join()
        eng.close()
    message = str(failure.value)
    assert doomed.url in message and "connection failed" in message and "wrote nothing" in message
    assert delivered and all(n == m for n, m in delivered)  # every round that returned was whole
    assert not out.exists()  # no partial rollout files


def test_rollout_with_launch_server_starts_and_stops_its_own_server(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["rollout", "--engine", "server", "--launch_server", "--server_parallel", "2", "--server_threads",
                 "1", "--task", "chain_sum", "--num_prompts", "1", "--width", "2", "--depth", "2",
                 "--segment-len", "8", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trajectories"] == 2
    assert summary["servers"]["kind"] == "llama.cpp" and summary["servers"]["dialect"] == "token_ids"


def test_training_against_a_llama_server_treepo_did_not_start_is_refused_with_the_fix(server, tmp_path, capsys):
    assert main(["train", "--engine", "server", "--server-url", server.url, "--steps", "1",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "cannot load new weights over HTTP" in err and "--launch_server" in err and "Traceback" not in err
