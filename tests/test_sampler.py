"""The TreePO sampler against a scripted fake engine: invariants (hypothesis) and hand-worked cases."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fakes import EOS, FakeEngine
from treepo.config import SamplerConfig
from treepo.errors import InputError
from treepo.rollout.sampler import TreeSampler
from treepo.tree import FINISH_REASONS, PromptTree

PROMPTS = [[ord(c) for c in "what is 2+2?"], [ord(c) for c in "name a colour"], [ord(c) for c in "hi"]]


def run(cfg: SamplerConfig, engine: FakeEngine, prompts=PROMPTS):
    return TreeSampler(cfg, engine).rollout(prompts)


def check_tree_against_engine(tree: PromptTree, engine: FakeEngine, cfg: SamplerConfig) -> None:
    """The invariants every rollout must satisfy, checked against what the engine really produced."""
    counts = tree.multiplicity()
    if cfg.budget == "particles" or cfg.mode == "independent":  # leaves hold the width particles between them
        assert counts is not None and sum(counts) == cfg.width and min(counts) >= 1
        assert 1 <= len(tree.leaves) <= cfg.width and tree.fallbacks == 0
    else:
        assert counts is None and len(tree.leaves) == cfg.width, "exactly width trajectories"
    assert len(set(tree.leaves)) == len(tree.leaves)
    # where the tokens go: decoded = sum of multiplicity x answer length - S, exactly
    assert tree.decoded_tokens == tree.particle_tokens - tree.shared_tokens
    assert tree.shared_tokens >= 0
    for leaf in tree.leaves:
        assert tree.nodes[leaf].finish_reason is not None
        assert 1 <= len(leaf) <= cfg.depth
        # a leaf is never forked again: no node lies below it
        assert not any(len(i) > len(leaf) and i[: len(leaf)] == leaf for i in tree.nodes)
        traj = tree.trajectory(leaf)
        # segment k of the trajectory is exactly what the engine generated for node leaf[:k]
        starts = [0] + traj.segment_ends[:-1]
        for k, (a, b) in enumerate(zip(starts, traj.segment_ends), start=1):
            assert traj.token_ids[a:b] == engine.generated[(tree.prompt_index, leaf[:k])][: b - a]
            assert (tree.nodes[leaf[:k]].start, tree.nodes[leaf[:k]].end) == (a, b)  # the node's token span
        assert len(traj.token_ids) <= cfg.response_budget
        assert len(traj.logprobs) == len(traj.token_ids) == len(traj.entropies)
    # every request's context is the prompt plus the generated tokens of its ancestors
    for call in engine.calls:
        for req in call:
            if req.group != tree.prompt_index:
                continue
            expected = [tree.prompt_ids] + [engine.generated[(req.group, req.node_id[:k])] for k in range(1, len(req.node_id))]
            assert [list(c) for c in req.context] == expected
    # every node's parent exists (fallback cuts are segment aligned: they fork at a kept node)
    for node_id in tree.nodes:
        assert len(node_id) == 1 or node_id[:-1] in tree.nodes


@st.composite
def configs(draw):
    width = draw(st.integers(1, 12))
    lo = draw(st.integers(0, width))
    hi = draw(st.one_of(st.just(0), st.integers(max(lo, 1), width))) if lo else 0
    depth = draw(st.integers(1, 5))
    budget = draw(st.sampled_from(["particles", "transfer", "branch"]))
    return SamplerConfig(
        budget=budget,
        fork_depth=draw(st.integers(0, depth - 1)) if budget == "particles" else 0,
        mode=draw(st.sampled_from(["tree", "independent"])),
        width=width,
        depth=depth,
        segment_len=draw(st.integers(1, 6)),
        branching=draw(st.integers(2 if budget == "particles" and lo < width else 1, 4)),
        init_divergence=lo,
        init_divergence_max=hi,
        **({} if budget == "particles" else dict(  # the particle rule has no such knobs
            divergence_policy=draw(st.sampled_from(["fixed_avg", "low_prob", "high_prob", "entropy"])),
            divergence_score=draw(st.sampled_from(["last_mean", "path_mean", "path_sum"])),
            fallback_policy=draw(st.sampled_from(["finished", "any", "root"])),
            fallback_max_backtrack=draw(st.integers(0, 3)))),
        answer_policy=draw(st.sampled_from(["boxed_and_eos", "boxed_as_eos", "none"])),
        max_response_tokens=draw(st.integers(0, 20)),
        seed=draw(st.integers(0, 10**6)),
    )


@settings(max_examples=150, deadline=None)
@given(cfg=configs(), p_stop=st.floats(0, 0.9), script_seed=st.integers(0, 10**6))
def test_invariants_hold_for_every_config(cfg, p_stop, script_seed):
    def script(req):
        r = random.Random(hash((script_seed, req.group, req.node_id)))
        u = r.random()
        if u < p_stop / 2:
            return {"text": "ok", "eos": True}
        if u < p_stop * 3 / 4:
            return {"text": "\\boxed{4}", "eos": r.random() < 0.5}
        return None

    engine = FakeEngine(script=script)
    result = run(cfg, engine)
    assert len(result.trees) == len(PROMPTS)
    for tree in result.trees:
        check_tree_against_engine(tree, engine, cfg)
        if cfg.mode == "independent":
            assert tree.decoded_tokens == tree.leaf_tokens and tree.fallbacks == 0
            assert sorted(tree.leaves) == sorted(tree.leaves, key=lambda x: x) and {l[0] for l in tree.leaves} == set(range(cfg.width))
    assert sorted(engine.released) == [0, 1, 2]
    assert result.rounds == len(engine.calls)


@settings(max_examples=60, deadline=None)
@given(cfg=configs(), seed=st.integers(0, 1000))
def test_shared_id_prefix_iff_shared_tokens(cfg, seed):
    engine = FakeEngine()  # every node's first token is unique
    tree = run(cfg, engine).trees[0]
    trajs = list(tree.trajectories())
    for a in trajs:
        for b in trajs:
            for k in range(1, min(len(a.node_path), len(b.node_path)) + 1):
                same_ids = a.node_path[:k] == b.node_path[:k]
                same_tokens = a.token_ids[: a.segment_ends[k - 1]] == b.token_ids[: b.segment_ends[k - 1]]
                assert same_ids == same_tokens


def test_full_tree_shape_and_saving():
    cfg = SamplerConfig(width=16, depth=4, segment_len=3, branching=2)
    engine = FakeEngine()
    tree = run(cfg, engine, PROMPTS[:1]).trees[0]
    assert [len(c) for c in engine.calls] == [2, 4, 8, 16]
    assert all(tree.nodes[leaf].finish_reason == "depth" for leaf in tree.leaves)
    assert tree.decoded_tokens == 30 * 3 and tree.leaf_tokens == 64 * 3


def test_width_cap_stops_forking():
    cfg = SamplerConfig(width=8, depth=4, segment_len=2, branching=2)
    engine = FakeEngine()
    run(cfg, engine, PROMPTS[:1])
    assert [len(c) for c in engine.calls] == [2, 4, 8, 8]


def test_all_prompts_share_each_engine_call():
    cfg = SamplerConfig(width=4, depth=3, segment_len=2, branching=2)
    engine = FakeEngine()
    run(cfg, engine)
    assert len(engine.calls) == 3
    for call in engine.calls:
        assert {r.group for r in call} == {0, 1, 2}


def test_budget_transfer_gives_finished_forks_to_survivors():
    # round 1: path (0,) ends with EOS, (1,) survives -> total = max(1, min(3, 2*1 + 2*1)) = 3
    cfg = SamplerConfig(width=4, depth=3, segment_len=2, branching=2, budget="transfer")
    engine = FakeEngine(script=lambda r: {"text": "x", "eos": True} if r.node_id == (0,) else None)
    tree = run(cfg, engine, PROMPTS[:1]).trees[0]
    assert [r.node_id for r in engine.calls[1]] == [(1, 0), (1, 1), (1, 2)]
    assert tree.nodes[(0,)].finish_reason == "eos"
    assert len(tree.leaves) == 4


def test_low_prob_policy_in_a_rollout_forks_the_least_likely_path_most():
    cfg = SamplerConfig(width=8, depth=2, segment_len=2, branching=2, budget="transfer", divergence_policy="low_prob",
                        divergence_temperature=0.05)
    engine = FakeEngine()
    tree = run(cfg, engine, PROMPTS[:1]).trees[0]
    mean_lp = {i: sum(tree.nodes[(i,)].logprobs) / 2 for i in (0, 1)}
    low = min(mean_lp, key=mean_lp.get)
    kids = Counter(leaf[0] for leaf in tree.leaves)
    assert kids[low] > kids[1 - low]


def test_random_initial_divergence_really_varies():
    cfg = SamplerConfig(width=8, depth=1, segment_len=1, init_divergence=2, init_divergence_max=8)
    engine = FakeEngine()
    trees = run(cfg, engine, [[65]] * 40).trees
    fanouts = [t.root_fanout for t in trees]
    assert set(fanouts) <= set(range(2, 9)) and len(set(fanouts)) >= 4
    assert [len([r for r in engine.calls[0] if r.group == t.prompt_index]) for t in trees] == fanouts


def test_fallback_cuts_at_segment_boundaries_and_rebuilds_context():
    # every path ends with EOS in its 2nd segment: 2 leaves after round 2, width 6 -> backtrack
    cfg = SamplerConfig(width=6, depth=4, segment_len=3, branching=2, budget="transfer", fallback_policy="finished")
    engine = FakeEngine(script=lambda r: {"text": "ab", "eos": True} if len(r.node_id) == 2 else None)
    tree = run(cfg, engine, PROMPTS[:1]).trees[0]
    assert len(tree.leaves) == 6 and tree.fallbacks >= 1
    fallback_nodes = [n for n in tree.nodes.values() if n.fallback]
    assert fallback_nodes
    for node in fallback_nodes:
        parent = node.id[:-1]
        # forked at a kept prefix of an earlier path: the parent is an ancestor of a leaf, or the prompt
        assert parent == () or any(leaf[: len(parent)] == parent and len(leaf) > len(parent) for leaf in tree.leaves)
    check_tree_against_engine(tree, engine, cfg)


def test_fallback_without_candidates_restarts_from_the_prompt():
    # every path ends by repetition at depth 1: no answer/EOS candidates -> restart from the root
    cfg = SamplerConfig(width=4, depth=3, segment_len=16, rep_window=2, rep_count=4, budget="transfer")
    engine = FakeEngine(script=lambda r: {"text": "abababababababab"} if len(r.node_id) == 1 else None)
    tree = run(cfg, engine, PROMPTS[:1]).trees[0]
    assert all(len(leaf) == 1 for leaf in tree.leaves)
    assert all(tree.nodes[leaf].finish_reason == "repetition" for leaf in tree.leaves)
    assert sorted(tree.leaves) == [(0,), (1,), (2,), (3,)]


@pytest.mark.parametrize(
    "reason, cfg_kwargs, script",
    [
        ("answer", {}, lambda r: {"text": "so \\boxed{4}", "eos": True}),
        ("answer", {"answer_policy": "boxed_as_eos"}, lambda r: {"text": "\\boxed{4} and"}),
        ("eos", {}, lambda r: {"text": "four", "eos": True}),
        ("max_tokens", {"max_response_tokens": 5}, None),
        ("depth", {}, None),
        ("repetition", {"rep_window": 3, "rep_count": 3}, lambda r: {"text": "abcabcabcabcabcx"}),
        ("stop", {"stop_strings": ["STOP"]}, lambda r: {"text": "abSTOPcd"}),
        ("max_turns", {"env": "toy_envs:Always", "segment_mode": "turn", "max_turns": 2},
         lambda r: {"text": "hmm", "eos": True}),
        ("env_done", {"env": "toy_envs:Never"}, lambda r: {"text": "hmm", "eos": True}),
        ("env_error", {"env": "toy_envs:Raises"}, lambda r: {"text": "hmm", "eos": True}),
    ],
)
def test_every_finish_reason_is_reachable(reason, cfg_kwargs, script):
    assert reason in FINISH_REASONS
    cfg = SamplerConfig(width=2, depth=3, segment_len=16, **cfg_kwargs)
    engine = FakeEngine(script=script)
    tree = run(cfg, engine, PROMPTS[:1]).trees[0]
    assert {tree.nodes[leaf].finish_reason for leaf in tree.leaves} == {reason}


def test_the_reachability_cases_cover_every_finish_reason():
    cases = test_every_finish_reason_is_reachable.pytestmark[0].args[1]
    assert {case[0] for case in cases} == set(FINISH_REASONS)


def test_box_split_across_segments_is_found():
    texts = {1: "x = \\box", 2: "ed{42} done"}
    cfg = SamplerConfig(width=1, depth=4, segment_len=16, branching=1)
    engine = FakeEngine(script=lambda r: {"text": texts.get(len(r.node_id), ""), "eos": len(r.node_id) == 2})
    tree = run(cfg, engine, PROMPTS[:1]).trees[0]
    assert tree.leaves == [(0, 0)] and tree.nodes[(0, 0)].finish_reason == "answer"


def test_eos_as_first_token_of_a_segment_is_caught():
    cfg = SamplerConfig(width=2, depth=3, segment_len=4)
    engine = FakeEngine(script=lambda r: {"text": "", "eos": True} if len(r.node_id) == 2 else None)
    tree = run(cfg, engine, PROMPTS[:1]).trees[0]
    eos_leaves = [leaf for leaf in tree.leaves if tree.nodes[leaf].finish_reason == "eos"]
    assert eos_leaves and all(tree.nodes[leaf].token_ids == [EOS] for leaf in eos_leaves)


def test_repetition_priority_first_beats_eos():
    script = lambda r: {"text": "abcabcabc", "eos": True}  # noqa: E731
    last = run(SamplerConfig(width=1, depth=2, segment_len=12, rep_window=3, rep_count=3), FakeEngine(script=script))
    first = run(SamplerConfig(width=1, depth=2, segment_len=12, rep_window=3, rep_count=3, rep_priority="first"),
                FakeEngine(script=script))
    assert last.trees[0].nodes[(0,)].finish_reason == "eos"
    assert first.trees[0].nodes[(0,)].finish_reason == "repetition"


def test_same_seed_same_trees_and_different_seed_differs():
    cfg = SamplerConfig(width=8, depth=3, segment_len=2, init_divergence=1, init_divergence_max=5, seed=7)
    script = lambda r: {"text": "e", "eos": True} if hash(r.node_id) % 3 == 0 else None  # noqa: E731
    a = run(cfg, FakeEngine(script=script, unique_first_token=False))
    b = run(cfg, FakeEngine(script=script, unique_first_token=False))
    assert [t.to_dict() for t in a.trees] == [t.to_dict() for t in b.trees]
    cfg2 = SamplerConfig(width=8, depth=3, segment_len=2, init_divergence=1, init_divergence_max=5, seed=8)
    c = run(cfg2, FakeEngine(script=script, unique_first_token=False))
    assert [t.root_fanout for t in a.trees] != [t.root_fanout for t in c.trees] or [
        t.to_dict() for t in a.trees
    ] != [t.to_dict() for t in c.trees]


def test_tree_round_trips_through_json():
    import json

    tree = run(SamplerConfig(width=4, depth=2, segment_len=2), FakeEngine()).trees[0]
    back = PromptTree.from_dict(json.loads(json.dumps(tree.to_dict())))
    assert back == tree


def test_prompt_longer_than_context_is_refused_before_any_work():
    engine = FakeEngine(max_context=20)
    with pytest.raises(InputError, match="prompt 0 has 12 tokens.*context 20"):
        run(SamplerConfig(width=2, depth=2, segment_len=8), engine, PROMPTS[:1])
    assert engine.calls == []


def test_fallback_that_keeps_a_prefix_rebuilds_the_whole_context():
    # fan-out 1, b=2, depth 3 reaches 4 of 8 leaves; backtracking one segment forks at depth 2
    cfg = SamplerConfig(width=8, depth=3, segment_len=2, branching=2, init_divergence=1, budget="transfer",
                        fallback_policy="any", fallback_max_backtrack=1)
    engine = FakeEngine()
    tree = run(cfg, engine, PROMPTS[:1]).trees[0]
    deep = [n for n in tree.nodes.values() if n.fallback]
    assert deep and all(len(n.id) == 3 for n in deep)
    check_tree_against_engine(tree, engine, cfg)  # each fallback request carried prompt + 2 segments


def test_max_tokens_comes_before_depth_when_both_apply():
    cfg = SamplerConfig(width=1, depth=2, segment_len=3, branching=1, max_response_tokens=6)
    tree = run(cfg, FakeEngine(), PROMPTS[:1]).trees[0]
    assert tree.nodes[tree.leaves[0]].finish_reason == "max_tokens"


def test_an_engine_overshooting_the_cap_is_truncated_and_loses_its_eos():
    class Overshoot(FakeEngine):
        def generate(self, requests):
            outs = super().generate(requests)
            for o in outs:  # three extra tokens, the last an EOS, beyond max_new_tokens
                o.token_ids += [120, 121, 0]
                o.logprobs += [-1.0] * 3
                o.entropies += [1.0] * 3
                o.hit_eos = True
            return outs

    cfg = SamplerConfig(width=2, depth=2, segment_len=4)
    tree = run(cfg, Overshoot(), PROMPTS[:1]).trees[0]
    assert all(len(n.token_ids) == 4 and not n.hit_eos for n in tree.nodes.values())
    assert {tree.nodes[leaf].finish_reason for leaf in tree.leaves} == {"depth"}
