"""The server engine's text dialect (llama-cpp-python's `llama_cpp.server`) end to end, against an in-process fake.

llama-cpp-python's server takes text prompts only and names the sampled tokens by their strings; the
engine detects it at start-up (`/extras/tokenize`, `owned_by: me`), sends each context as text that it
has checked tokenises back to the context's ids, and reads the ids back from the per-token strings.
tests/fake_text_server.py speaks that server's routes and answers as llama-cpp-python 0.3.36 does, with
a tiny torch model, so what a real llama.cpp build would blur (quantised numerics) is exact here: the
engine's ids must be exactly the ones the server sampled, its log-probs the model's, and greedy leaves
the embedded engine's. (This replaced a test against a from-source build of llama-cpp-python[server],
which cost every fresh setup about 5 minutes; the token-id dialect runs against the real C++
llama-server in tests/test_llama_server.py.)
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import tiny
from fake_text_server import FakeLlamaCppPython
from treepo.config import EngineConfig, SamplerConfig
from treepo.engines.base import SegmentRequest
from treepo.engines.loading import load_engine
from treepo.rollout.sampler import TreeSampler

EOS = 1


def readable_model():
    """The tiny random Llama, made to draw only tokens whose string names one vocabulary entry.

    The tiny byte-level tokenizer has many byte pieces of multi-byte characters, whose strings (bytes decoded
    with errors="ignore") name no token; a random model draws them often, a real one rarely. A token the
    strings cannot name is re-drawn (tested with scripted answers in tests/test_server_engine.py); here the
    draws must be checkable id for id. So the residual stream's coordinate 0 is held at a constant (every
    embedding writes it, no layer does), and the LM head adds 30 times it to every nameable token's logit and
    nothing to the others, which then lose by e^-30 or so."""
    from treepo.engines.server_checks import string_table

    tok = tiny.tokenizer()
    model = tiny.model(seed=0)
    table = string_table(tok, len(tok))
    nameable = torch.tensor([i for i in range(len(tok)) if table.get(tok.decode([i], skip_special_tokens=False,
                                                                                 clean_up_tokenization_spaces=False), -1) == i])
    with torch.no_grad():
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()  # untied
        model.model.embed_tokens.weight[:, 0] = 2.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        head = model.lm_head.weight
        other = torch.ones(len(tok), dtype=torch.bool)
        other[nameable] = False
        head[other] = 0.0
        head[nameable, 0] = 30.0
    return model, tok


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    model, tok = readable_model()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fake(model_dir):
    with FakeLlamaCppPython(AutoModelForCausalLM.from_pretrained(model_dir), tiny.tokenizer()) as s:
        yield s


@pytest.fixture(scope="module")
def embedded(model_dir):
    return load_engine(EngineConfig(model=str(model_dir), temperature=0.0))


def server_engine(model_dir, fake, **cfg):
    return load_engine(EngineConfig(model=str(model_dir), engine="server", server_url=[fake.url], **cfg), seed=0)


def teacher_forced(model, prompt: list[int], response: list[int]) -> list[float]:
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1: -1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1).tolist()


def test_tree_rollout_through_the_text_dialect(model_dir, fake, embedded):
    eng = server_engine(model_dir, fake, server_concurrency=4)
    assert (eng.dialect, eng.server_kind, eng.model_name) == ("text", "llama-cpp-python", "fake-gguf")
    assert "/extras/tokenize" in fake.routes and "/tokenize" not in fake.routes  # its own tokenise route, first
    fake.requests.clear()  # the start-up probe
    result = TreeSampler(SamplerConfig(width=4, depth=3, segment_len=16, seed=1), eng).rollout(tiny.prompts()[:2])
    report = eng.server_report()
    stats = report["servers"][0]
    segments = [n for t in result.trees for n in t.nodes.values() if n.id]
    assert [len(t.leaves) for t in result.trees] == [4, 4]
    assert all(isinstance(r["body"]["prompt"], str) for r in fake.requests)  # text, never ids
    assert fake.ignored_fields == set()  # every field the engine sends is one the server reads
    # one request per segment, plus one per re-draw after a token whose string names no id for certain
    assert stats["requests"] == len(segments) + report["unmappable_tokens"] == len(fake.requests)
    assert stats["failures"] == 0
    assert stats["completion_tokens"] == sum(len(n.token_ids) for n in segments)
    sent = {(tuple(r["prompt_ids"]), r["body"]["seed"]): r for r in fake.requests}
    matched = exact = 0
    for tree in result.trees:
        for node in tree.nodes.values():
            if not node.id:
                continue
            context = [t for chunk in tree.context(node.id[:-1]) for t in chunk]
            seed = eng._seed(SegmentRequest(tree.prompt_index, node.id, (), 0))
            request = sent.get((tuple(context), seed))
            # the server saw exactly the tree's context, unless its text tokenises otherwise (counted, warned about)
            if request is None:
                continue
            assert node.logprobs == pytest.approx(teacher_forced(embedded.model, context, node.token_ids), abs=1e-4)
            matched += 1
            sampled = request["sampled"]
            if sampled[-1:] == [EOS]:  # the server stopped at EOS and did not return it
                assert node.hit_eos and node.token_ids[: len(sampled) - 1] == sampled[:-1]
            else:
                assert node.token_ids[: len(sampled)] == sampled  # a re-draw may only have cut and continued it
            exact += node.token_ids == [t for t in sampled if t != EOS]
    if report["unmappable_tokens"] == 0:
        assert matched == exact == len(segments) - report["retokenized_contexts"] > 0
    print(f"text dialect: {len(segments)} segments, retokenized contexts {report['retokenized_contexts']}, "
          f"unmappable tokens {report['unmappable_tokens']}")
    eng.close()


def test_greedy_leaves_are_the_embedded_engines(model_dir, fake, embedded):
    eng = server_engine(model_dir, fake, temperature=0.0)
    cfg = SamplerConfig(width=2, depth=3, segment_len=8, seed=1, answer_policy="none", rep_count=0)
    remote = TreeSampler(cfg, eng).rollout(tiny.prompts()).trees
    local = TreeSampler(cfg, embedded).rollout(tiny.prompts()).trees
    for r_tree, l_tree in zip(remote, local):
        r_leaves = [t.token_ids for t in r_tree.trajectories()]
        l_leaves = [t.token_ids[:-1] if t.token_ids[-1:] == [EOS] else t.token_ids for t in l_tree.trajectories()]
        assert all(leaf == r_leaves[0] for leaf in r_leaves)  # greedy: a tree's leaves are one path
        r, lo = r_leaves[0], l_leaves[0]
        k = next((i for i, (a, b) in enumerate(zip(r, lo)) if a != b), None)
        if k is not None:  # only where two tokens tie to float rounding (cached vs full forward) may they part
            ref = torch.log_softmax(embedded.model(torch.tensor([r_tree.prompt_ids + r[:k]])).logits[0, -1], -1)
            assert abs(float(ref[lo[k]] - ref[r[k]])) < 1e-4, (k, r, lo)
        else:
            assert len(r) == len(lo) or EOS in l_tree.trajectories()[0].token_ids[-1:]
    eng.close()


def test_ignore_eos_asks_for_min_tokens_and_gets_whole_segments(model_dir, fake):
    eng = server_engine(model_dir, fake, ignore_eos=True)
    fake.requests.clear()
    result = TreeSampler(SamplerConfig(width=2, depth=2, segment_len=6, seed=2), eng).rollout(tiny.prompts()[:1])
    assert fake.requests and all(r["body"]["min_tokens"] == r["body"]["max_tokens"] for r in fake.requests)
    assert all(EOS not in r["sampled"] for r in fake.requests)  # EOS was masked while sampling
    if eng.unmappable_tokens == 0:
        assert all(len(n.token_ids) == 6 and not n.hit_eos for t in result.trees for n in t.nodes.values() if n.id)
    eng.close()


def test_a_text_server_refuses_id_prompts_so_the_engine_never_sends_them(fake):
    import requests

    answer = requests.post(fake.url + "/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 2}, timeout=5)
    assert answer.status_code == 422  # what llama-cpp-python's pydantic request model answers
    assert requests.post(fake.url + "/tokenize", json={"content": "x"}, timeout=5).status_code == 404
