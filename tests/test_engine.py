"""The embedded transformers engine on tiny random models: exactness against the model's own forward."""

from __future__ import annotations

import pytest
import torch

import tiny
from treepo.config import EngineConfig, SamplerConfig
from treepo.engines.backends import HFDecoder, LeanDecoder
from treepo.engines.base import SegmentRequest
from treepo.engines.sampling import sample_tokens
from treepo.engines.transformers_engine import TransformersEngine
from treepo.gpu_check.correctness import full_forward_logprobs, greedy_reference
from treepo.rollout.sampler import TreeSampler


def engine(kind="llama", **cfg):
    return TransformersEngine(tiny.model(kind), tiny.tokenizer(), EngineConfig(**cfg))


@pytest.mark.parametrize("kind, backend", [("llama", "lean"), ("llama", "hf"), ("qwen2", "lean"), ("qwen3", "lean"), ("gpt2", "hf")])
def test_greedy_tree_leaves_equal_greedy_independent_samples(kind, backend):
    eng = engine(kind, temperature=0.0, ignore_eos=True, backend=backend)
    assert eng.decoder.name == backend
    prompts = tiny.prompts()
    tree_cfg = SamplerConfig(width=4, depth=3, segment_len=5, branching=2, answer_policy="none", rep_count=0)
    ind_cfg = SamplerConfig(mode="independent", width=4, depth=3, segment_len=5, answer_policy="none", rep_count=0)
    tree = TreeSampler(tree_cfg, eng).rollout(prompts)
    ind = TreeSampler(ind_cfg, engine(kind, temperature=0.0, ignore_eos=True, backend=backend)).rollout(prompts)
    for t_tree, t_ind, prompt in zip(tree.trees, ind.trees, prompts):
        reference = greedy_reference(eng.model, prompt, 15)
        leaves = [t.token_ids for t in t_tree.trajectories()]
        samples = [t.token_ids for t in t_ind.trajectories()]
        assert leaves == [reference] * 4
        assert samples == [reference] * 4
    # the tree decoded fewer tokens for the same leaves: 2+4+4 segments instead of 4+4+4
    assert sum(t.decoded_tokens for t in tree.trees) == 3 * 10 * 5
    assert sum(t.decoded_tokens for t in ind.trees) == 3 * 12 * 5


@pytest.mark.parametrize("kind, backend", [("llama", "lean"), ("qwen3", "lean"), ("gpt2", "hf")])
def test_engine_logprobs_and_entropies_match_a_full_forward(kind, backend):
    eng = engine(kind, temperature=0.8, top_p=0.9, backend=backend)
    cfg = SamplerConfig(width=6, depth=3, segment_len=6, branching=2, budget="transfer", seed=3, answer_policy="none", rep_count=0)
    result = TreeSampler(cfg, eng).rollout(tiny.prompts())
    checked = 0
    for tree in result.trees:
        for traj in tree.trajectories():
            lp, ent = full_forward_logprobs(eng.model, tree.prompt_ids, traj.token_ids, 0.8)
            assert torch.allclose(torch.tensor(traj.logprobs), lp, atol=1e-4), (traj.logprobs, lp.tolist())
            assert torch.allclose(torch.tensor(traj.entropies), ent, atol=1e-4)
            checked += 1
    assert checked == 18


def test_fallback_rows_prefill_their_kept_prefix_in_the_same_batch():
    eng = engine(temperature=0.0, ignore_eos=True)
    p = tiny.prompts()[0]
    first = eng.generate([SegmentRequest(0, (0,), (tuple(p),), 4), SegmentRequest(0, (1,), (tuple(p),), 4)])
    seg = tuple(first[0].token_ids)
    foreign = tuple(tiny.tokenizer()("step by step")["input_ids"])  # never generated: must be prefilled
    requests = [
        SegmentRequest(0, (0, 0), (tuple(p), seg), 7),  # continues a row of the last call
        SegmentRequest(0, (7, 0), (tuple(p), foreign), 3),  # a fallback-like branch from the root
        SegmentRequest(0, (2,), (tuple(p),), 5),  # a fresh root child
    ]
    before = eng.stats.prefill_tokens
    out = eng.generate(requests)
    assert eng.stats.prefill_tokens - before == len(foreign)  # the prompt was not prefilled again
    for req, o in zip(requests, out):
        assert o.token_ids == greedy_reference(eng.model, req.context_ids(), req.max_new_tokens)


def test_rows_stopping_early_are_compacted_without_disturbing_the_others():
    eng = engine(temperature=0.0, ignore_eos=True)
    ps = tiny.prompts()
    lengths = [2, 3, 9, 9, 9, 1, 9, 9]
    requests = [SegmentRequest(i, (0,), (tuple(ps[i % 3]),), n) for i, n in enumerate(lengths)]
    out = eng.generate(requests)
    assert [len(o.token_ids) for o in out] == lengths
    assert eng.stats.computed_decode_rows < 9 * len(lengths)  # stopped rows were dropped from the batch
    for req, o in zip(requests, out):
        assert o.token_ids == greedy_reference(eng.model, req.context_ids(), req.max_new_tokens)
    # only rows that ran every step can be continued
    assert set(eng._front.index) == {(i, (0,)) for i, n in enumerate(lengths) if n == 9}


def test_eos_stops_a_row_and_is_kept_as_its_last_token():
    model = tiny.model()
    eng = TransformersEngine(model, tiny.tokenizer(), EngineConfig(temperature=0.0))
    p = tiny.prompts()[0]
    first = greedy_reference(model, p, 1)[0]
    eng.eos_ids = frozenset({first})  # make the greedy first token count as EOS
    eng._eos = torch.tensor([first])
    out = eng.generate([SegmentRequest(0, (0,), (tuple(p),), 5)])[0]
    assert out.token_ids == [first] and out.hit_eos


def test_seeded_sampling_is_reproducible():
    cfg = SamplerConfig(width=4, depth=2, segment_len=6, seed=11)
    a = TreeSampler(cfg, engine()).rollout(tiny.prompts())
    b = TreeSampler(cfg, engine()).rollout(tiny.prompts())
    assert [t.to_dict() for t in a.trees] == [t.to_dict() for t in b.trees]
    c = TreeSampler(SamplerConfig(width=4, depth=2, segment_len=6, seed=12), engine()).rollout(tiny.prompts())
    assert [t.to_dict() for t in a.trees] != [t.to_dict() for t in c.trees]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_auto_backend_picks_the_lean_decoder_when_it_matches(kind):
    assert isinstance(engine(kind).decoder, LeanDecoder)
    assert isinstance(engine("gpt2").decoder, HFDecoder)


def test_sampling_top_k_and_top_p_truncate_but_logprobs_do_not():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_tokens(logits, 1.0, top_k=2, generator=g)[0]) for _ in range(200)}
    assert seen == {0, 1}
    seen = {int(sample_tokens(logits, 1.0, top_p=0.8, generator=g)[0]) for _ in range(200)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.8: the rest is cut
    tok, lp, ent = sample_tokens(logits, 1.0, top_p=0.5, generator=g)
    assert int(tok) == 0 and float(lp) == pytest.approx(torch.log(torch.tensor(0.5)).item(), abs=1e-6)
    expected_entropy = -(torch.tensor([0.5, 0.3, 0.15, 0.05]) * torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))).sum()
    assert float(ent) == pytest.approx(float(expected_entropy), abs=1e-6)
    tok, lp, _ = sample_tokens(logits, 0.0)
    assert int(tok) == 0 and float(lp) == pytest.approx(-0.6931, abs=1e-4)


def test_finished_prompts_free_their_cache():
    eng = engine(temperature=0.0, ignore_eos=True)
    TreeSampler(SamplerConfig(width=2, depth=2, segment_len=3), eng).rollout(tiny.prompts())
    assert eng._roots == {}


def test_inverse_cdf_draw_matches_the_weights_and_never_picks_a_zero():
    from treepo.engines.sampling import _draw

    weights = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).repeat(20000, 1)
    picks = _draw(weights, torch.Generator().manual_seed(1))
    freq = torch.bincount(picks, minlength=4).float() / len(picks)
    assert freq[1] == 0
    assert torch.allclose(freq, torch.tensor([0.1, 0.0, 0.6, 0.3]), atol=0.015)


@pytest.mark.parametrize("check_every", [1, 4])  # 4 = the CUDA setting: stopped rows run several extra steps
def test_rows_with_long_contexts_and_short_budgets_stay_inside_the_cache(check_every):
    eng = engine(temperature=0.0, ignore_eos=True)
    eng._check_every = check_every
    long_prompt = tuple(range(2, 202))
    requests = [SegmentRequest(0, (0,), (long_prompt,), 2)] + [
        SegmentRequest(i, (0,), (tuple(tiny.prompts()[2]),), 40) for i in range(1, 8)
    ]
    out = eng.generate(requests)
    assert [len(o.token_ids) for o in out] == [2] + [40] * 7
    for req, o in zip(requests, out):
        assert o.token_ids == greedy_reference(eng.model, req.context_ids(), req.max_new_tokens)


def test_fallback_siblings_share_one_prefill_of_their_kept_prefix():
    eng = engine(temperature=0.0, ignore_eos=True)
    p = tuple(tiny.prompts()[0])
    prefix = tuple(tiny.tokenizer()("the lazy dog while the cat sleeps")["input_ids"])
    eng.generate([SegmentRequest(0, (0,), (p,), 3)])  # the prompt's root is now cached
    before = eng.stats.prefill_tokens
    siblings = [SegmentRequest(0, (0, k), (p, prefix), 4) for k in (1, 2, 3)]
    out = eng.generate(siblings)
    assert eng.stats.prefill_tokens - before == len(prefix)  # once, not three times
    assert out[0].token_ids == out[1].token_ids == out[2].token_ids == greedy_reference(eng.model, p + prefix, 4)


def test_a_front_row_is_only_reused_for_the_same_context():
    eng = engine(temperature=0.0, ignore_eos=True)
    p = tuple(tiny.prompts()[0])
    first = eng.generate([SegmentRequest(0, (0,), (p,), 3)])[0]
    # same parent id (0,), but a different parent segment: must not continue the cached row
    other = tuple(t for t in tiny.tokenizer()("fox jumps")["input_ids"])
    assert other != tuple(first.token_ids)
    out = eng.generate([SegmentRequest(0, (0, 0), (p, other), 3)])[0]
    assert out.token_ids == greedy_reference(eng.model, p + other, 3)


@pytest.mark.parametrize("check_every", [1, 4])
def test_rollouts_with_frequent_eos_and_fallbacks_keep_exact_logprobs(check_every):
    model = tiny.model()
    model.generation_config.eos_token_id = [t for t in range(2, model.config.vocab_size) if t % 5 == 0]
    eng = TransformersEngine(model, tiny.tokenizer(), EngineConfig(temperature=1.0))
    eng._check_every = check_every
    # root fan-out 1, b=2, depth 3 reaches only 4 of 8 leaves: fallbacks must cut at depth 2 and keep a prefix
    cfg = SamplerConfig(width=8, depth=3, segment_len=4, branching=2, init_divergence=1, budget="transfer", seed=5, answer_policy="none",
                        rep_count=0, fallback_policy="any", fallback_max_backtrack=1, max_response_tokens=10)
    result = TreeSampler(cfg, eng).rollout(tiny.prompts())
    deep_fallbacks = [n for t in result.trees for n in t.nodes.values() if n.fallback and len(n.id) >= 3]
    assert len(deep_fallbacks) >= 3, "the scenario must exercise fallbacks that keep a prefix"
    assert any(n.hit_eos for t in result.trees for n in t.nodes.values()), "and rows that stop at EOS"
    for tree in result.trees:
        assert len(tree.leaves) == 8
        for traj in tree.trajectories():
            lp, _ = full_forward_logprobs(model, tree.prompt_ids, traj.token_ids)
            assert torch.allclose(torch.tensor(traj.logprobs), lp, atol=1e-4), traj.node_path


def test_rows_from_mixed_sources_are_continued_from_the_right_row_next_call():
    eng = engine(temperature=0.0, ignore_eos=True)
    ps = [tuple(p) for p in tiny.prompts()]
    r1 = eng.generate([SegmentRequest(0, (0,), (ps[0],), 3), SegmentRequest(2, (0,), (ps[2],), 3)])
    prefix = tuple(tiny.tokenizer()("the cat sleeps")["input_ids"])
    # front row, staged fallback row, front row: the batch reorders them by source
    round2 = [
        SegmentRequest(0, (0, 0), (ps[0], tuple(r1[0].token_ids)), 3),
        SegmentRequest(1, (4, 0), (ps[1], prefix), 3),
        SegmentRequest(2, (0, 0), (ps[2], tuple(r1[1].token_ids)), 3),
    ]
    r2 = eng.generate(round2)
    round3 = [SegmentRequest(r.group, r.node_id + (0,), r.context + (tuple(o.token_ids),), 3) for r, o in zip(round2, r2)]
    before = eng.stats.prefill_tokens
    r3 = eng.generate(round3)
    assert eng.stats.prefill_tokens == before  # every row continued from the front: nothing prefilled
    for req, o in zip(round3, r3):
        assert o.token_ids == greedy_reference(eng.model, req.context_ids(), 3)


def test_sync_weights_makes_the_engine_follow_updated_weights():
    eng = engine(temperature=1.0)
    cfg = SamplerConfig(width=2, depth=2, segment_len=4, seed=1)
    TreeSampler(cfg, eng).rollout(tiny.prompts()[:1])
    with torch.no_grad():
        for p in eng.model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # an "optimizer step"
    eng.sync_weights()
    tree = TreeSampler(cfg, eng).rollout(tiny.prompts()[:1]).trees[0]
    for traj in tree.trajectories():
        lp, _ = full_forward_logprobs(eng.model, tree.prompt_ids, traj.token_ids)
        assert torch.allclose(torch.tensor(traj.logprobs), lp, atol=1e-4)
