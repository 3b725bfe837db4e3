"""VerlEngine, treepo's engine protocol over verl's server client, with a scripted client (no Ray)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from fakes import FakeTokenizer
from verl.workers.rollout.replica import TokenOutput

from treepo.engines.base import Engine, SegmentRequest
from treepo.errors import ServerError
from treepo.integrations.verl.engine import VerlEngine


class Client:
    """verl's LLMServerClient.generate, scripted: `answer(prompt_ids, max_tokens)` -> TokenOutput or raises."""

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    async def generate(self, request_id, *, prompt_ids, sampling_params):
        self.calls.append((request_id, list(prompt_ids), dict(sampling_params)))
        await asyncio.sleep(0)
        return self.answer(prompt_ids, sampling_params["max_tokens"])


def _run(engine_of, requests):
    """Drive the engine from a thread, as the agent loop does, while its event loop runs."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        engine = engine_of(loop)
        return engine, engine.generate(requests)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def test_a_round_goes_out_as_token_ids_with_the_segment_length_on_one_request_id():
    client = Client(lambda ids, m: TokenOutput(token_ids=[40] * m if ids[-1] != 7 else [41, 0], log_probs=[-0.1] * (m if ids[-1] != 7 else 2),
                                              stop_reason="completed", extra_fields={"num_cached_tokens": 2, "global_steps": 5}))
    reqs = [SegmentRequest(0, (0,), ((1, 2, 3),), 4), SegmentRequest(0, (1,), ((1, 2, 3), (5, 6, 7)), 4)]
    engine, outs = _run(lambda loop: VerlEngine(client, FakeTokenizer(), loop, request_id="treepo-u", sampling_params={
        "temperature": 1.0, "logprobs": False}, max_context=64), reqs)
    assert isinstance(engine, Engine)
    assert [c[0] for c in client.calls] == ["treepo-u", "treepo-u"]  # sticky: one id per tree
    assert [c[1] for c in client.calls] == [[1, 2, 3], [1, 2, 3, 5, 6, 7]]  # the parent's ids, never text
    assert all(c[2]["max_tokens"] == 4 and c[2]["logprobs"] is True for c in client.calls)
    assert [o.token_ids for o in outs] == [[40] * 4, [41, 0]]
    assert [o.hit_eos for o in outs] == [False, True]  # EOS (id 0) returned last, as the embedded engine does
    assert engine.cached_prompt_tokens == 4 and engine.stats.prefill_tokens == 3 + 6 - 4
    assert engine.weight_versions == {5} and engine.stats.decode_tokens == 6


@pytest.mark.parametrize("answer,match", [
    (lambda ids, m: (_ for _ in ()).throw(RuntimeError("actor died")), r"server failed in the middle of tree treepo-u.*actor died"),
    (lambda ids, m: TokenOutput(token_ids=[], stop_reason="aborted"), r"aborted a generation request"),
    (lambda ids, m: TokenOutput(token_ids=[5], stop_reason="abort"), r"aborted a generation request"),  # SGLang
    (lambda ids, m: TokenOutput(token_ids=[], stop_reason="completed"), r"returned no tokens"),
    (lambda ids, m: TokenOutput(token_ids=[5] * (m + 1), log_probs=[0.0] * (m + 1)), r"does not honour max_tokens"),
])
def test_a_failing_server_fails_the_round_with_the_reason(answer, match):
    with pytest.raises(ServerError, match=match):
        _run(lambda loop: VerlEngine(Client(answer), FakeTokenizer(), loop, request_id="treepo-u", sampling_params={},
                                     max_context=64), [SegmentRequest(0, (0,), ((1, 2),), 3)] * 2)


def test_a_hung_server_abandons_the_tree_after_the_round_timeout():
    class Hung:
        async def generate(self, request_id, *, prompt_ids, sampling_params):
            await asyncio.sleep(3600)

    with pytest.raises(ServerError, match=r"round_timeout=0.2 s; the server looks hung"):
        _run(lambda loop: VerlEngine(Hung(), FakeTokenizer(), loop, request_id="t", sampling_params={}, max_context=64,
                                     round_timeout=0.2), [SegmentRequest(0, (0,), ((1,),), 3)])


def test_every_eos_id_of_the_generation_config_ends_a_path():
    """Qwen2.5 stops at two ids; a full-length segment ending in the second one still ends its path."""
    client = Client(lambda ids, m: TokenOutput(token_ids=[40] * (m - 1) + [99], log_probs=[-0.1] * m))
    _, outs = _run(lambda loop: VerlEngine(client, FakeTokenizer(), loop, request_id="t", sampling_params={},
                                           max_context=64, eos_ids=(99,)), [SegmentRequest(0, (0,), ((1,),), 3)])
    assert outs[0].hit_eos and outs[0].token_ids == [40, 40, 99]


def test_the_adaptive_shape_is_chosen_per_step_from_the_workers_earlier_steps():
    """Step 1 samples independently (no lengths yet); its trees' lengths choose step 2's shape; every tree of a
    step grows the same shape; a tree of an older step arriving late does not join the new step's lengths."""
    from treepo.config.sampler import TrainSamplerConfig
    from treepo.integrations.verl.shapes import StepShapes
    from treepo.tree import Node, PromptTree

    cfg = TrainSamplerConfig(width=8, depth=8, segment_len=16)
    shapes = StepShapes(cfg)
    first = shapes.shape_for(1)
    assert first.independent and shapes.shape_for(1) is first

    def long_answers() -> PromptTree:  # 8 independent answers that all run to the budget: long shared prefixes pay
        tree = PromptTree(0, [1])
        for i in range(8):
            for k in range(1, 9):
                tree.nodes[(i,) + (0,) * (k - 1)] = Node((i,) + (0,) * (k - 1), [5] * 16, [0.0] * 16, [0.0] * 16,
                                                         start=16 * (k - 1))
            tree.leaves.append((i,) + (0,) * 7)
            tree.particles[tree.leaves[-1]] = 1
        return tree

    for _ in range(4):
        shapes.finished(1, long_answers())
    second = shapes.shape_for(2)
    assert not second.independent and second.root_fanout < 8 and second.expected_saving > 0
    shapes.finished(1, long_answers())  # late: step 2 has begun
    assert shapes.trees == [] and shapes.shape_for(2) is second
