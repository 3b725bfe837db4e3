"""The server engine against an in-process fake completions server: protocol, routing, faults, bad input."""

from __future__ import annotations

import json
import math
import threading
import time

import pytest

import tiny
from fake_server import FakeServer, token_at
from treepo import cli
from treepo.config import EngineConfig, SamplerConfig
from treepo.engines.base import SegmentRequest
from treepo.engines.server import ServerEngine
from treepo.errors import ConfigError, InputError, ServerError
from treepo.rollout.sampler import TreeSampler

SHAPE = dict(width=4, depth=3, segment_len=5, branching=2, seed=3, budget="transfer")  # width leaves each


def engine(urls, **cfg) -> ServerEngine:
    cfg = {"server_timeout": 2.0, "server_retries": 3, **cfg}
    return ServerEngine(EngineConfig(engine="server", server_url=list(urls), **cfg), tiny.tokenizer(), backoff=0.01)


@pytest.fixture()
def server():
    with FakeServer(tiny.tokenizer()) as s:
        yield s


def nodes(result) -> dict:
    return {(t.prompt_index, n.id): n.token_ids for t in result.trees for n in t.nodes.values() if n.id}


def test_tree_rollout_sends_token_ids_and_gets_every_segment_back(server):
    eng = engine([server.url])
    assert (eng.dialect, eng.model_name) == ("token_ids", "fake-model")
    server.completions.clear()  # the start-up probe
    result = TreeSampler(SamplerConfig(**SHAPE), eng).rollout(tiny.prompts())
    assert [len(t.leaves) for t in result.trees] == [4, 4, 4]
    sent = {(tuple(b["prompt"]), b["seed"]): b for b in server.completions}
    assert len(sent) == len(server.completions) == len(nodes(result))  # one request per node, none twice
    for tree in result.trees:
        for node in tree.nodes.values():
            if not node.id:
                continue
            context = [t for chunk in tree.context(node.id[:-1]) for t in chunk]
            seed = eng._seed(SegmentRequest(tree.prompt_index, node.id, (), 0))
            body = sent[(tuple(context), seed)]  # the server saw exactly the tree's ids for this node's context
            assert body["max_tokens"] == 5 and body["return_token_ids"] and body["temperature"] == 1.0
            expected = [token_at(context, body["seed"], k, server.vocab) for k in range(len(node.token_ids))]
            assert node.token_ids == [t for t, _ in expected] and node.logprobs == [lp for _, lp in expected]
            assert node.hit_eos == (node.token_ids[-1] == 1)
            assert all(math.isnan(e) for e in node.entropies)
    seeds = [b["seed"] for b in server.completions]
    assert len(set(seeds)) == len(seeds)
    report = eng.server_report()["servers"][0]
    assert report["requests"] == len(sent) and report["failures"] == 0
    assert report["completion_tokens"] == sum(len(v) for v in nodes(result).values())
    assert 0 < report["cached_prompt_tokens"] < report["prompt_tokens"]  # the fake's prefix cache saw shared prefixes
    eng.close()


def test_faults_are_retried_and_the_rollout_is_the_same_as_without_them():
    prompts = tiny.prompts()
    with FakeServer(tiny.tokenizer()) as clean:
        eng = engine([clean.url])
        reference = nodes(TreeSampler(SamplerConfig(**SHAPE), eng).rollout(prompts))
        eng.close()
    faults = ["drop", "500", "garbage", "slow", "nochoices"]
    with FakeServer(tiny.tokenizer(), slow_seconds=3.0) as flaky:
        eng = engine([flaky.url], server_timeout=1.0, server_retries=5, server_concurrency=1)
        flaky.faults = list(faults)
        got = nodes(TreeSampler(SamplerConfig(**SHAPE), eng).rollout(prompts))
        stats = eng.server_report()["servers"][0]
        eng.close()
    assert got == reference  # nothing lost, nothing duplicated, same tokens (per-node seeds survive retries)
    assert stats["failures"] == stats["retries"] == len(faults)
    assert stats["requests"] == len(reference)


def test_a_server_that_stays_down_stops_the_round_with_an_error_naming_it(server):
    eng = engine([server.url], server_retries=2)
    url = server.url
    server.stop()
    sampler = TreeSampler(SamplerConfig(**SHAPE), eng)
    started = time.perf_counter()
    with pytest.raises(ServerError, match=f"failed 3 times.*{url}: connection failed"):
        sampler.rollout(tiny.prompts())
    assert time.perf_counter() - started < 10
    assert eng.server_report()["servers"][0]["failures"] >= 3


def test_garbage_after_every_retry_is_an_error_not_a_trajectory():
    with FakeServer(tiny.tokenizer()) as s:
        eng = engine([s.url], server_retries=2, server_concurrency=1)
        s.faults = ["garbage"] * 3
        with pytest.raises(ServerError, match="unusable answer"):
            TreeSampler(SamplerConfig(**SHAPE), eng).rollout(tiny.prompts()[:1])
        eng.close()


def test_routing_round_robin_and_least_loaded():
    tok = tiny.tokenizer()
    with FakeServer(tok) as a, FakeServer(tok) as b:
        eng = engine([a.url, b.url], server_routing="round_robin", server_concurrency=1)
        a.completions.clear(), b.completions.clear()  # the start-up probes
        TreeSampler(SamplerConfig(**SHAPE), eng).rollout(tiny.prompts())
        counts = [s["requests"] for s in eng.server_report()["servers"]]
        assert abs(counts[0] - counts[1]) <= 1 and sum(counts) == len(a.completions) + len(b.completions)
        eng.close()
    with FakeServer(tok, delay=0.2) as slow, FakeServer(tok) as fast:
        eng = engine([slow.url, fast.url], server_routing="least_loaded", server_concurrency=4)
        TreeSampler(SamplerConfig(**SHAPE), eng).rollout(tiny.prompts())
        counts = [s["requests"] for s in eng.server_report()["servers"]]
        assert counts[1] > 2 * counts[0] > 0  # requests pile up on the slow server, so the fast one gets more
        eng.close()


def test_a_dead_server_among_two_is_routed_around():
    tok = tiny.tokenizer()
    with FakeServer(tok) as a, FakeServer(tok) as b:
        eng = engine([a.url, b.url], server_routing="round_robin", server_retries=2)
        a.stop()
        b.completions.clear()
        result = TreeSampler(SamplerConfig(**SHAPE), eng).rollout(tiny.prompts())
        stats = eng.server_report()["servers"]
        assert [len(t.leaves) for t in result.trees] == [4, 4, 4]
        assert stats[0]["requests"] == 0 and stats[0]["failures"] >= 1
        assert stats[1]["requests"] == len(nodes(result)) == len(b.completions)
        eng.close()


def test_generate_delivers_in_request_order_under_concurrency():
    with FakeServer(tiny.tokenizer(), delay=0.05) as s:
        eng = engine([s.url], server_concurrency=6)
        requests = [SegmentRequest(g, (0,), (tuple(p),), 3 + g) for g, p in enumerate(tiny.prompts() * 3)]
        outputs = eng.generate(requests)
        for r, out in zip(requests, outputs):
            seed = eng._seed(r)
            expected = [token_at(list(r.context[0]), seed, k, s.vocab)[0] for k in range(len(out.token_ids))]
            assert out.token_ids == expected and len(out.token_ids) <= r.max_new_tokens
        eng.close()


# -- bad input: a clear error before any rollout --------------------------------------------------


def test_a_url_that_is_not_a_completions_server():
    with FakeServer(tiny.tokenizer(), models=None) as s:
        with pytest.raises(InputError, match=f"server_url='{s.url}' is not an OpenAI-compatible server"):
            engine([s.url])


def test_nothing_listening():
    with FakeServer(tiny.tokenizer()) as s:
        url = s.url
    with pytest.raises(ServerError, match=f"cannot reach server {url}"):
        engine([url], server_retries=1)


def test_a_model_the_server_does_not_serve(server):
    with pytest.raises(InputError, match=r"does not serve server_model='other'; it serves \['fake-model'\]"):
        engine([server.url], server_model="other")
    with FakeServer(tiny.tokenizer(), models=["a", "b"]) as two:
        with pytest.raises(InputError, match="serves 2 models .* choose one with --server-model"):
            engine([two.url])
        assert engine([two.url], server_model="b").model_name == "b"


def test_a_server_with_another_tokenizer():
    with FakeServer(tiny.tokenizer(), tokenizer_shift=True) as s:
        with pytest.raises(InputError, match="tokenises differently from the local tokenizer"):
            engine([s.url])


def test_the_served_context_length_caps_prompts():
    with FakeServer(tiny.tokenizer(), max_model_len=20) as s:
        eng = engine([s.url])
        assert eng.max_context == 20
        with pytest.raises(InputError, match="> the model context 20"):
            TreeSampler(SamplerConfig(**SHAPE), eng).rollout(tiny.prompts())
        eng.close()


@pytest.mark.parametrize("cfg, message", [
    (dict(engine="server"), "needs --server-url"),
    (dict(server_url=["http://127.0.0.1:1"]), "add --engine server"),
    (dict(engine="server", server_url=["127.0.0.1:8000"]), "give a base URL"),
    (dict(engine="server", server_url=["http://x:1"], server_retries=-1), "server_retries=-1"),
    (dict(engine="server", server_url=["http://x:1"], server_concurrency=0), "server_concurrency=0"),
    (dict(engine="server", server_url=["http://x:1"], server_timeout=0), "server_timeout=0"),
])
def test_engine_config_checks(cfg, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig(**cfg)


# -- the command line -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return tiny.save_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture()
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "What is 12 plus 7?", "answer": "19"}\n{"prompt": "Count the letters in banana", "answer": "6"}\n')
    return path


def test_rollout_and_eval_commands_run_on_servers(server, tokenizer_dir, prompts_file, tmp_path, capsys):
    base = ["--model", str(tokenizer_dir), "--prompts", str(prompts_file), "--width", "4", "--depth", "3",
            "--segment-len", "4", "--engine", "server", "--server-url", server.url, server.url + "/v1"]
    assert cli.main(["rollout", *base, "--out", str(tmp_path / "r")]) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["trajectories"] == 8 and summary["servers"]["dialect"] == "token_ids"
    assert sum(s["requests"] for s in summary["servers"]["servers"]) == summary["segments"]
    assert "servers (token_ids prompts" in capsys.readouterr().err
    assert cli.main(["eval", *base, "--out", str(tmp_path / "e"), "--reward", "math_verify"]) == 0
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["problems"] == 2
    config = tmp_path / "run.yaml"
    config.write_text(f"engine:\n  engine: server\n  server_url: [{server.url}]\n  model: {tokenizer_dir}\n")
    assert cli.main(["rollout", "--config", str(config), "--prompts", str(prompts_file), "--width", "2",
                     "--depth", "1", "--segment-len", "2", "--out", str(tmp_path / "y")]) == 0


@pytest.mark.parametrize("args, message", [
    (["rollout", "--engine", "server"], "needs --server-url"),
    (["rollout", "--server-url", "http://127.0.0.1:9"], "add --engine server"),
    (["rollout", "--engine", "server", "--server-url", "http://127.0.0.1:9", "--budget", "transfer", "--shape", "fixed",
      "--divergence-policy", "entropy"], "servers do not report"),
    (["train", "--engine", "server", "--server-url", "http://127.0.0.1:9"], "cannot reach server http://127.0.0.1:9"),
    (["train", "--engine", "server", "--server-url", "http://127.0.0.1:9", "--old_logprobs", "engine"],
     "--old_logprobs recompute"),
    (["train", "--engine", "server", "--server-url", "http://127.0.0.1:9", "--launch_server"], "not both"),
    (["rollout", "--launch_server"], "launch_server is set but engine='transformers'"),
    (["train", "--weight_sync", "nccl", "--server_kind", "llama.cpp"], "use --weight_sync disk"),
])
def test_bad_server_flags_are_one_line(args, message, tmp_path, capsys):
    assert cli.main([*args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err.replace("\n", " ") and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_rollout_command_with_a_server_that_dies_writes_nothing(server, tokenizer_dir, prompts_file, tmp_path, capsys):
    server.faults = [None] * 3 + ["drop"] * 100
    out = tmp_path / "r"
    code = cli.main(["rollout", "--model", str(tokenizer_dir), "--prompts", str(prompts_file), "--engine", "server",
                     "--server-url", server.url, "--server-retries", "1", "--out", str(out)])
    err = capsys.readouterr().err.replace("\n", " ")
    assert code == 2 and f"{server.url}: connection failed" in err and "wrote nothing" in err
    assert not out.exists()


def test_threads_end_with_close(server):
    before = set(threading.enumerate())
    eng = engine([server.url])
    TreeSampler(SamplerConfig(**SHAPE), eng).rollout(tiny.prompts()[:1])
    eng.close()
    # the engine's own threads are gone; the fake server's per-connection handlers (server side) may linger
    left = [t for t in threading.enumerate() if t not in before and "process_request_thread" not in t.name]
    assert not left, left


def test_local_weights_are_not_loaded_for_a_server_config():
    from treepo.engines.loading import load_model

    with pytest.raises(ConfigError, match="local weights are loaded only for the embedded engine"):
        load_model(EngineConfig(engine="server", server_url=["http://127.0.0.1:9"]))


# -- the text dialect (llama-cpp-python) when a sampled token's id is uncertain ---------------------


class _ScriptedPool:
    """Stands in for ServerPool: answers completion requests from a script, recording each body."""

    def __init__(self, answers):
        self.answers, self.bodies = list(answers), []

    def post(self, path, body, parse, server=None):
        self.bodies.append(body)
        return parse(self.answers.pop(0))[0]


def _text_engine(answers) -> ServerEngine:
    from treepo.engines.base import EngineStats
    from treepo.engines.server_checks import string_table

    eng = object.__new__(ServerEngine)  # no server: the dialect and the pool are set by hand
    eng.cfg = EngineConfig(engine="server", server_url=["http://127.0.0.1:9"])
    eng.tokenizer, eng.vocab_size, eng.eos_ids = tiny.tokenizer(), len(tiny.tokenizer()), set()
    eng.stats, eng.seed, eng.model_name, eng.dialect = EngineStats(), 0, "m", "text"
    eng.retokenized_contexts = eng.unmappable_tokens = 0
    eng._lock = threading.Lock()
    eng._strings = string_table(eng.tokenizer, eng.vocab_size)
    eng.pool = _ScriptedPool(answers)
    return eng


def _answer(strings, logprobs, finish):
    return {"choices": [{"text": "".join(strings), "finish_reason": finish,
                         "logprobs": {"tokens": strings, "token_logprobs": logprobs}}]}


def _certain_strings(eng, n):
    """n token strings that name one vocabulary entry each."""
    return [(s, i) for s, i in eng._strings.items() if i >= 0 and len(s) > 1][:n]


def test_an_uncertain_token_keeps_the_prefix_and_draws_the_rest_again():
    probe = _text_engine([])
    (a, id_a), (c, id_c), (e, id_e) = _certain_strings(probe, 3)
    eng = _text_engine([_answer([a, "\ufffd", c], [-1.0, -2.0, -3.0], "length"), _answer([e], [-5.0], "stop")])
    canonical = eng.tokenizer(a + "\ufffd" + c, add_special_tokens=False)["input_ids"]
    assert len(canonical) != 3 or canonical[0] != id_a  # the text's tokenisation does not rescue it
    request = SegmentRequest(0, (0,), ((5, 6, 7),), 4)
    out = eng._complete(request, eng._body(request))
    assert out.token_ids == [id_a, id_e] and out.logprobs == [-1.0, -5.0] and out.hit_eos  # never a guessed id
    assert eng.unmappable_tokens == 1
    first, again = eng.pool.bodies
    assert again["max_tokens"] == 3 and again["seed"] != first["seed"]  # the rest, with another seed
    assert again["prompt"] == first["prompt"] + a  # from the kept prefix


def test_a_token_that_stays_uncertain_gives_a_shorter_segment_not_an_error():
    from treepo.engines.server import MAX_REDRAWS

    eng = _text_engine([_answer(["\ufffd"], [-1.0], "length")] * (MAX_REDRAWS + 1))
    request = SegmentRequest(0, (0,), ((5, 6, 7),), 4)
    out = eng._complete(request, eng._body(request))
    assert out.token_ids == [] and not out.hit_eos
    assert eng.unmappable_tokens == MAX_REDRAWS + 1 and not eng.pool.answers


def test_the_start_up_probe_is_greedy_whatever_the_sampling_temperature(server):
    eng = engine([server.url], temperature=1.0)
    probe = server.completions[0]
    assert probe["temperature"] == 0.0 and probe["max_tokens"] == 2
    server.completions.clear()
    TreeSampler(SamplerConfig(**SHAPE), eng).rollout(tiny.prompts()[:1])
    assert {b["temperature"] for b in server.completions} == {1.0}  # the rollout samples as configured
    eng.close()


def test_llama_server_log_probs_are_aligned_to_its_ids_and_a_skip_in_a_run_is_not_trusted():
    """llama-server lists no log-prob for a token after which the text ends mid-character (_align_native)."""
    import math

    from treepo.engines.server import _align_native
    from treepo.engines.server_pool import Unusable

    def show(out):
        return [None if math.isnan(x) else x for x in out[0]], out[1]

    assert show(_align_native([5, 6, 7], [(5, -1.0), (6, -2.0), (7, -3.0)])) == ([-1.0, -2.0, -3.0], 3)
    # token 6 ended mid-character: its entry is missing, the rest line up
    assert show(_align_native([5, 6, 7], [(5, -1.0), (7, -3.0)])) == ([-1.0, None, -3.0], 3)
    assert show(_align_native([5, 6, 7], [(5, -1.0), (6, -2.0)])) == ([-1.0, -2.0, None], 3)  # the last one
    # a skip inside a run of one id could be either of them: nothing from the run's start is trusted
    assert show(_align_native([5, 9, 9, 7], [(5, -1.0), (9, -2.0), (7, -3.0)]))[1] == 1
    assert show(_align_native([9, 9, 7], [(9, -2.0), (7, -3.0)]))[1] == 0
    # the same id skipped away from the one listed (a 4-byte character as byte tokens F0 9F 98 9F, only the
    # last listed): the leftmost place would give its log-prob to the wrong token, so only what comes before
    # that place is trusted (<0xF0> is missing for certain, and its log-prob is asked for again)
    assert show(_align_native([0xF0, 0x9F, 0x98, 0x9F], [(0x9F, -3.0)])) == ([None, -3.0, None, None], 1)
    assert show(_align_native([5, 0xF0, 0x9F, 0x98, 0x9F, 7], [(5, -1.0), (0x9F, -3.0), (7, -2.0)]))[1] == 2
    # a complete token followed by the same id ending mid-character: also not placed for certain
    assert show(_align_native([5, 8, 8], [(5, -1.0), (8, -2.0)]))[1] == 1
    with pytest.raises(Unusable):
        _align_native([5, 6], [(5, -1.0), (8, -2.0)])  # an entry for an id that was not sampled
