"""Multi-turn tree rollouts against the scripted fake engine: env turns in the tree, turn segments,
rollback at turn boundaries, the width invariant and turn counts, env errors."""

from __future__ import annotations

import json
import logging
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fakes import EOS, FakeEngine, encode
from treepo.rollout.accounting import summarize
from treepo.train.advantages import token_advantages
from treepo.config import SamplerConfig
from treepo.envs import Environment, EnvTurn, RecheckEnv
from treepo.envs.recheck import LAST_TURN, RECHECK
from treepo.rollout.sampler import TreeSampler, stop_cut
from treepo.tree import Node, PromptTree

PROMPT = encode("what is 6*7?")


def rollout(cfg, engine, prompts=(PROMPT,), env=None):
    return TreeSampler(cfg, engine, env=env).rollout([list(p) for p in prompts])


def check_env_tree(tree: PromptTree, engine: FakeEngine, cfg: SamplerConfig) -> None:
    """What every multi-turn rollout must satisfy, checked against what the engine really produced."""
    assert tree.group_size == cfg.width and len(tree.leaves) == len(set(tree.leaves))
    assert len(tree.leaves) == cfg.width or tree.multiplicity() is not None  # particles: leaves may hold several
    if tree.multiplicity() is not None:  # an env turn carries its segment's particles; a leaf keeps its own
        for node_id, node in tree.nodes.items():
            if node.env:
                assert tree.particles[node_id] == tree.particles[node_id[:-1]]
    for node_id, node in tree.nodes.items():
        assert len(node_id) == 1 or node_id[:-1] in tree.nodes
        if node.env:  # the only child of the model segment whose turn it answers, never decoded
            parent = tree.nodes[node_id[:-1]]
            assert not parent.env and parent.ends_turn and node_id[-1] == 0
            assert tree.children(node_id[:-1]) == [node_id]
            assert (tree.prompt_index, node_id) not in engine.generated
            assert node.logprobs == [0.0] * len(node) and node_id not in tree.leaves
        else:
            assert engine.generated[(tree.prompt_index, node_id)][: len(node)] == node.token_ids
        assert node.start == sum(len(n) for n in tree.path(node_id)[:-1])  # offsets count env tokens
    decoded = sum(len(n) for n in tree.nodes.values() if not n.env)
    assert tree.decoded_tokens == decoded
    for leaf in tree.leaves:
        assert not tree.nodes[leaf].env and tree.nodes[leaf].finish_reason
        assert sum(not n.env for n in tree.path(leaf)) <= cfg.depth
        traj = tree.trajectory(leaf)
        path = tree.path(leaf)
        assert traj.loss_mask == [not n.env for n in path for _ in n.token_ids]
        assert traj.turns == 1 + sum(n.env for n in path) <= cfg.turn_limit
        assert traj.segment_ends[-1] == len(traj.token_ids) <= cfg.response_budget
        assert len(traj.segment_ends) == len(leaf)
        if cfg.segment_mode == "turn":  # one segment per turn: every turn but the last was answered
            assert [n.env for n in path] == [k % 2 == 1 for k in range(len(path))]
    for call in engine.calls:  # every request's context is the prompt plus its path, env turns included
        for req in call:
            if req.group == tree.prompt_index:
                assert [list(c) for c in req.context] == [tree.prompt_ids] + [n.token_ids for n in tree.path(req.parent_id)]
                assert req.max_new_tokens <= cfg.segment_cap


class Echo(Environment):
    """Replies with token ids naming the turn; never finishes a path itself."""

    def check_finished(self, path):
        return None

    def next_turn(self, path):
        return EnvTurn(token_ids=encode(f"[ok{path.assistant_turns}]"))


# -- env tokens: context, not decoded, not trained --------------------------------------------------


def test_env_turns_are_context_not_decoded_and_masked():
    cfg = SamplerConfig(width=4, depth=3, segment_len=8, segment_mode="turn")
    engine = FakeEngine(script=lambda r: {"text": "hi", "eos": True})
    tree = rollout(cfg, engine, env=Echo()).trees[0]
    check_env_tree(tree, engine, cfg)
    assert engine.stats.decode_tokens == tree.decoded_tokens  # what the engine decoded, and nothing else
    env_tokens = sum(len(n) for n in tree.nodes.values() if n.env)
    assert env_tokens > 0 and tree.leaf_tokens == sum(len(tree.trajectory(leaf).token_ids) for leaf in tree.leaves) - \
        sum(len(n) for leaf in tree.leaves for n in tree.path(leaf) if n.env)
    traj = tree.trajectory(tree.leaves[0])
    assert traj.turns == 3 and traj.finish_reason == "depth"
    # "hi" EOS | [ok1] | "hi" EOS | [ok2] | "hi" EOS: the env tokens sit between the turns, masked
    assert traj.token_ids == encode("hi") + [EOS] + encode("[ok1]") + encode("hi") + [EOS] + encode("[ok2]") + \
        encode("hi") + [EOS]
    assert traj.loss_mask == [True] * 3 + [False] * 5 + [True] * 3 + [False] * 5 + [True] * 3
    assert traj.segment_ends == [3, 8, 11, 16, 19]
    summary = summarize([rollout(cfg, FakeEngine(script=lambda r: {"text": "hi", "eos": True}), env=Echo())], cfg)
    assert summary["env_turns"] == sum(n.env for n in tree.nodes.values()) and summary["env_tokens"] == env_tokens
    assert summary["decoded_tokens"] == tree.decoded_tokens and summary["mean_turns"] == 3


def test_trees_branch_below_env_turns_in_turn_mode():
    cfg = SamplerConfig(width=8, depth=3, segment_len=8, segment_mode="turn", branching=2)
    engine = FakeEngine(script=lambda r: {"text": "t", "eos": True})
    tree = rollout(cfg, engine, env=Echo()).trees[0]
    check_env_tree(tree, engine, cfg)
    assert [len(c) for c in engine.calls] == [2, 4, 8]  # the usual b-ary growth, one turn per round
    forks = [i for i in tree.nodes if len(tree.children(i)) > 1]
    assert forks and all(tree.nodes[i].env for i in forks)  # the tree forks only after an env turn
    assert sorted(tree.leaves)[0] == (0, 0, 0, 0, 0)


def test_turn_mode_segment_ends_at_a_stop_string_or_its_cap():
    cfg = SamplerConfig(width=2, depth=3, segment_len=99, segment_mode="turn", max_turn_tokens=6,
                        stop_strings=["</x>"])
    texts = {1: "ab</x>cdef", 2: "abcdefghij"}  # the engine ignores the stop; the sampler cuts
    engine = FakeEngine(script=lambda r: {"text": texts[len(r.node_id) // 2 + 1]})
    tree = rollout(cfg, engine, env=Echo()).trees[0]
    assert all(r.max_new_tokens == 6 and r.stop == ("</x>",) for r in engine.calls[0])
    first = tree.nodes[(0,)]
    assert first.text == "ab</x>" and first.hit_stop and not first.hit_eos and first.ends_turn
    leaf = tree.nodes[tree.leaves[0]]
    assert leaf.text == "abcdef" and leaf.finish_reason == "max_tokens"  # a turn cut by its cap ends the path


def test_without_an_env_a_turn_is_the_whole_answer():
    cfg = SamplerConfig(width=4, depth=3, segment_len=8, segment_mode="turn", stop_strings=["!"])
    engine = FakeEngine(script=lambda r: {"text": "done!more"} if r.node_id[0] % 2 else {"text": "ok", "eos": True})
    tree = rollout(cfg, engine).trees[0]
    assert {tree.nodes[leaf].finish_reason for leaf in tree.leaves} == {"stop", "eos"}
    assert all(len(leaf) == 1 for leaf in tree.leaves) and not any(n.env for n in tree.nodes.values())


def test_fixed_segments_with_an_env_answer_only_at_turn_ends():
    # fixed 6-token segments; the first turn ends at "</c>" inside the second segment
    cfg = SamplerConfig(width=2, depth=4, segment_len=6, stop_strings=["</c>"], branching=1, budget="transfer")
    engine = FakeEngine(script=lambda r: {"text": "a</c>zz" if len(r.node_id) == 2 else "wxyzwx"})
    tree = rollout(cfg, engine, env=Echo()).trees[0]
    check_env_tree(tree, engine, cfg)
    leaf = tree.leaves[0]
    path = tree.path(leaf)
    assert [n.env for n in path] == [False, False, True, False, False]  # segment, segment | env | segment, segment
    assert path[1].text == "a</c>" and path[1].hit_stop and tree.nodes[leaf].finish_reason == "depth"
    # backtracking may fork mid-turn or after the env turn, never between the closed turn and its reply
    assert tree.fork_points(leaf) == [(), (0,), (0, 0, 0), (0, 0, 0, 0)]


def test_stop_string_split_across_fixed_segments_is_found():
    decode = FakeEngine().decode
    assert stop_cut(decode, encode("ab</"), encode("c>def"), ["</c>"]) == 2
    assert stop_cut(decode, [], encode("xx</c>yy</c>"), ["</c>"]) == 6
    assert stop_cut(decode, [], encode("nothing"), ["</c>"]) is None
    assert stop_cut(decode, encode("</c>"), encode("a</c>"), ["</c>"]) == 5  # an old match before is ignored


def test_env_turn_that_does_not_fit_the_budget_ends_the_path():
    class Big(Echo):
        def next_turn(self, path):
            return EnvTurn(token_ids=encode("x" * 30))

    cfg = SamplerConfig(width=2, depth=4, segment_len=8, segment_mode="turn")  # budget 32
    engine = FakeEngine(script=lambda r: {"text": "hi", "eos": True})
    tree = rollout(cfg, engine, env=Big()).trees[0]
    assert {tree.nodes[leaf].finish_reason for leaf in tree.leaves} == {"max_tokens"}
    assert not any(n.env for n in tree.nodes.values())  # the reply was dropped, the leaf is the model's turn
    roomy = SamplerConfig(width=2, depth=4, segment_len=8, segment_mode="turn", max_response_tokens=80)
    tree = rollout(roomy, FakeEngine(script=lambda r: {"text": "hi", "eos": True}), env=Big()).trees[0]
    assert {tree.trajectory(leaf).turns for leaf in tree.leaves} == {3}  # 3 + 30 + 3 + 30 + 3 <= 80 < + 30
    assert {tree.nodes[leaf].finish_reason for leaf in tree.leaves} == {"max_tokens"}


def test_env_turns_that_fill_the_budget_before_the_depth_end_the_path():
    class Medium(Echo):
        def next_turn(self, path):
            return EnvTurn(token_ids=encode("x" * 9))

    cfg = SamplerConfig(width=2, depth=4, segment_len=8, segment_mode="turn")  # budget 32
    engine = FakeEngine(script=lambda r: {"text": "abcdef", "eos": True})  # 7 tokens a turn
    tree = rollout(cfg, engine, env=Medium()).trees[0]
    check_env_tree(tree, engine, cfg)
    # 7 + 9 + 7 + 9 = 32 > budget: the second reply does not fit
    assert {tree.nodes[leaf].finish_reason for leaf in tree.leaves} == {"max_tokens"}
    assert all(tree.trajectory(leaf).turns == 2 for leaf in tree.leaves)


# -- rollback in turn mode ------------------------------------------------------------------------


def test_rollback_cuts_at_turn_boundaries_and_keeps_width_and_turn_counts():
    # every path answers in its second turn: 2 leaves after round 2 of width 6 -> backtracking
    cfg = SamplerConfig(width=6, depth=4, segment_len=16, segment_mode="turn", fallback_policy="finished",
                        budget="transfer")

    def script(r):
        return {"text": "\\boxed{42}", "eos": True} if len(r.node_id) >= 3 else {"text": "hmm", "eos": True}

    engine = FakeEngine(script=script)
    tree = rollout(cfg, engine, env=Echo()).trees[0]
    check_env_tree(tree, engine, cfg)
    fallback_nodes = [n for n in tree.nodes.values() if n.fallback]
    assert tree.fallbacks >= 1 and fallback_nodes
    for node in fallback_nodes:  # regrown at the prompt or right after an env turn: a turn boundary
        assert node.id[:-1] == () or tree.nodes[node.id[:-1]].env
    for leaf in tree.leaves:  # turn counts come from each path, right after the rollback
        path = tree.path(leaf)
        assert tree.trajectory(leaf).turns == sum(not n.env for n in path)
        reason = tree.nodes[leaf].finish_reason
        assert reason == ("answer" if "\\boxed" in path[-1].text else "eos")


def test_recheck_after_rollback_asks_by_the_path_not_the_round():
    """ms-swift kept 'finish next turn' in mutable sample state; here the message follows the path's own turn count."""
    cfg = SamplerConfig(width=6, depth=4, segment_len=200, segment_mode="turn", max_turns=3, fallback_policy="any",
                        budget="transfer",
                        init_divergence=1)  # 1, 2, 4 paths reach the limit together: 2 more by rollback
    engine = FakeEngine(script=lambda r: {"text": "not sure", "eos": True})
    tree = rollout(cfg, engine, env=RecheckEnv()).trees[0]
    check_env_tree(tree, engine, cfg)
    assert tree.fallbacks >= 1
    for node_id, node in tree.nodes.items():
        if node.env:
            turns_so_far = sum(not n.env for n in tree.path(node_id))
            expected = LAST_TURN if turns_so_far == 2 else RECHECK
            assert expected in node.text, (node_id, node.text)
    for leaf in tree.leaves:
        assert tree.nodes[leaf].finish_reason == "max_turns" and tree.trajectory(leaf).turns == 3


def test_recheck_limit_uses_or_not_a_bitwise_or():
    cfg = SamplerConfig(width=2, depth=6, segment_len=200, segment_mode="turn")
    engine = FakeEngine(script=lambda r: {"text": "hm", "eos": True})
    tree = rollout(cfg, engine, env=RecheckEnv(max_turns=2)).trees[0]  # 2 | 6 would be 6
    assert {tree.trajectory(leaf).turns for leaf in tree.leaves} == {2}
    assert {tree.nodes[leaf].finish_reason for leaf in tree.leaves} == {"max_turns"}
    tree = rollout(cfg, FakeEngine(script=lambda r: {"text": "hm", "eos": True}), env=RecheckEnv()).trees[0]
    assert {tree.trajectory(leaf).turns for leaf in tree.leaves} == {6}  # unset: the run's limit (depth)
    boxed = FakeEngine(script=lambda r: {"text": "\\boxed{4}" if len(r.node_id) == 3 else "hm", "eos": True})
    tree = rollout(cfg, boxed, env=RecheckEnv()).trees[0]
    assert {tree.nodes[leaf].finish_reason for leaf in tree.leaves} == {"answer"}
    assert {tree.trajectory(leaf).turns for leaf in tree.leaves} == {2}


@st.composite
def turn_configs(draw):
    width = draw(st.integers(1, 10))
    depth = draw(st.integers(1, 5))
    budget = draw(st.sampled_from(["particles", "transfer"]))
    return SamplerConfig(
        budget=budget,
        mode=draw(st.sampled_from(["tree", "independent"])),
        width=width, depth=depth,
        segment_len=draw(st.integers(4, 12)),
        segment_mode=draw(st.sampled_from(["fixed", "turn"])),
        branching=draw(st.integers(2 if budget == "particles" else 1, 3)),
        **({} if budget == "particles" else dict(  # the particle rule has no such knobs
            divergence_policy=draw(st.sampled_from(["fixed_avg", "low_prob", "entropy"])),
            fallback_policy=draw(st.sampled_from(["finished", "any", "root"])),
            fallback_max_backtrack=draw(st.integers(0, 2)))),
        max_turns=draw(st.integers(0, depth)),
        stop_strings=["</c>"],
        env="toy_envs:Always",
        seed=draw(st.integers(0, 10**6)),
    )


@settings(max_examples=120, deadline=None)
@given(cfg=turn_configs(), p_end=st.floats(0, 1), p_err=st.floats(0, 0.3), script_seed=st.integers(0, 10**6))
def test_width_invariant_and_turn_structure_for_every_config(cfg, p_end, p_err, script_seed):
    class Sometimes(Environment):  # answers, ends the episode, or breaks, by a hash of the path
        def check_finished(self, path):
            return "said_done" if "done" in path.text else None

        def next_turn(self, path):
            u = random.Random(hash((script_seed, path.node_id))).random()
            if u < p_err:
                raise RuntimeError("flaky tool")
            return None if u < p_err + 0.1 else EnvTurn(token_ids=encode("[r]"))

    def script(req):
        r = random.Random(hash((script_seed, req.group, req.node_id)))
        u = r.random()
        if u < p_end / 3:
            return {"text": "ok", "eos": True}
        if u < 2 * p_end / 3:
            return {"text": "a<c>1</c>b"}
        if u < p_end * 0.8:
            return {"text": "done", "eos": r.random() < 0.5}
        return None

    engine = FakeEngine(script=script)
    result = rollout(cfg, engine, prompts=[PROMPT, encode("hi")], env=Sometimes())
    for tree in result.trees:
        check_env_tree(tree, engine, cfg)
        for leaf in tree.leaves:
            for point in tree.fork_points(leaf):  # never between a closed turn and its reply
                assert point == () or not tree.nodes[point].ends_turn
        for node in tree.nodes.values():
            if node.fallback:
                assert node.id[:-1] == () or not tree.nodes[node.id[:-1]].ends_turn
    summary = summarize([result], cfg)
    assert summary["group_size"] == cfg.width
    assert summary["trajectories"] == 2 * cfg.width or cfg.budget == "particles"
    assert summary["env_errors"] == summary["finish_reasons"].get("env_error", 0)


# -- advantages with env levels ------------------------------------------------------------------


def test_tree_advantage_ignores_env_levels():
    """An env node has the same leaves as its parent: grouping by raw ids would count that subgroup twice."""
    cfg = SamplerConfig(width=4, depth=2, segment_len=8, segment_mode="turn")
    tree = rollout(cfg, FakeEngine(script=lambda r: {"text": "t", "eos": True}), env=Echo()).trees[0]
    ids, lengths = zip(*(tree.model_path(leaf) for leaf in tree.leaves))
    assert sorted(ids) == [(0, 0), (0, 1), (1, 0), (1, 1)]  # the shape of the same tree without env levels
    assert sorted(tree.leaves) == [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1)]
    assert [sum(x) for x in lengths] == [len(tree.response_ids(leaf)) for leaf in tree.leaves]
    rewards = [1.0 if i == (0, 0) else -1.0 for i in ids]
    k = ids.index((0, 0))
    advs = token_advantages("average", ids, rewards, lengths)
    # by hand: root term 1 - (-0.5) = 1.5, node (0,) term 1 - 0 = 1; average 1.25 on every token
    assert advs[k] == pytest.approx([1.25] * len(tree.response_ids(tree.leaves[k])))
    raw = token_advantages("average", list(tree.leaves), rewards, [[len(n) for n in tree.path(x)] for x in tree.leaves])
    assert raw[k][0] == pytest.approx((1.5 + 1 + 1) / 3)  # what grouping by raw ids would give: node (0,) twice
    seg = token_advantages("segment", ids, rewards, lengths)
    # segment values: V(0,)-V(root) = 0.5 on turn 1 and its env reply, V(0,0)-V(0,) = 1 on turn 2
    first_turn = len(tree.nodes[(0,)]) + len(tree.nodes[(0, 0)])
    assert seg[k] == pytest.approx([0.5] * first_turn + [1.0] * len(tree.nodes[tree.leaves[k]]))


# -- env errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name, message", [
    ("Raises", "next_turn raised RuntimeError: tool crashed"),
    ("RaisesInCheck", "check_finished raised KeyError"),
    ("BadReason", "check_finished returned 7"),
])
def test_a_broken_env_finishes_paths_with_env_error_and_logs(name, message, caplog):
    cfg = SamplerConfig(width=3, depth=3, segment_len=8, segment_mode="turn", env=f"toy_envs:{name}", init_divergence=3)
    engine = FakeEngine(script=lambda r: {"text": "hi", "eos": True})
    with caplog.at_level(logging.WARNING, logger="treepo.rollout.sampler"):
        result = TreeSampler(cfg, engine).rollout([PROMPT])
    tree = result.trees[0]
    assert tree.group_size == 3 and {tree.nodes[leaf].finish_reason for leaf in tree.leaves} == {"env_error"}
    assert summarize([result], cfg)["env_errors"] == 3
    assert message in caplog.text and f"{name}." in caplog.text and "env_error" in caplog.text


def test_every_kind_of_malformed_turn_is_an_env_error_with_its_reason(caplog):
    cfg = SamplerConfig(width=1, depth=2, segment_len=8, segment_mode="turn", env="toy_envs:Malformed")
    engine = FakeEngine(script=lambda r: {"text": "hi", "eos": True})
    with caplog.at_level(logging.WARNING, logger="treepo.rollout.sampler"):
        trees = TreeSampler(cfg, engine).rollout([PROMPT] * 6).trees
    assert [t.nodes[t.leaves[0]].finish_reason for t in trees] == ["env_error"] * 6
    for reason in ("returned list, not EnvTurn", "exactly one of messages or token_ids", "non-empty list of",
                   "outside the vocabulary", "renders to no tokens"):
        assert reason in caplog.text, reason


def test_env_error_logging_is_rate_limited(caplog):
    cfg = SamplerConfig(width=1, depth=2, segment_len=4, segment_mode="turn", env="toy_envs:Raises")
    sampler = TreeSampler(cfg, FakeEngine(script=lambda r: {"text": "h", "eos": True}))
    with caplog.at_level(logging.WARNING, logger="treepo.rollout.sampler"):
        sampler.rollout([PROMPT] * 250)
    assert sampler.env_errors == 250
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5 + 2  # 5 in full, then one at 100 and one at 200 errors
    assert "200 errors so far" in lines[-1]


def test_custom_finish_reason_from_check_finished():
    cfg = SamplerConfig(width=2, depth=3, segment_len=8, segment_mode="turn", env="toy_envs:Custom")
    engine = FakeEngine(script=lambda r: {"text": "done" if len(r.node_id) == 3 else "go", "eos": True})
    tree = TreeSampler(cfg, engine).rollout([PROMPT]).trees[0]
    assert {tree.nodes[leaf].finish_reason for leaf in tree.leaves} == {"said_done"}
    assert all(tree.trajectory(leaf).turns == 2 for leaf in tree.leaves)


# -- files ---------------------------------------------------------------------------------------


def test_env_trees_round_trip_and_old_files_load():
    cfg = SamplerConfig(width=2, depth=3, segment_len=8, segment_mode="turn")
    cfg = SamplerConfig(width=2, depth=3, segment_len=8, segment_mode="turn", stop_strings=["</c>"])
    tree = rollout(cfg, FakeEngine(script=lambda r: {"text": "x</c>"}), env=Echo()).trees[0]
    back = PromptTree.from_dict(json.loads(json.dumps(tree.to_dict())))
    assert back == tree and any(n.env for n in back.nodes.values())
    old = {k: v for k, v in tree.nodes[(0,)].to_dict().items() if k not in ("env", "hit_stop")}  # before issue 6
    node = Node.from_dict(old)
    assert node.env is False and node.hit_stop is False and node.token_ids == tree.nodes[(0,)].token_ids


def test_classify_order_with_an_environment_and_turn_segments():
    from treepo.answers import has_boxed_answer
    from treepo.rollout.stopping import classify

    def reason(cfg, text="x", eos=False, stop=False, length=5, depth=1, env=None):
        return classify(cfg, segment_text=text, response_text=text, hit_eos=eos, hit_stop=stop, response_len=length,
                        depth=depth, predicate=has_boxed_answer, env_check=env)

    fixed, turn = SamplerConfig(depth=3, segment_len=8), SamplerConfig(depth=3, segment_len=8, segment_mode="turn")
    asked = []

    def env(answer=None):
        return lambda: asked.append(1) or answer

    assert reason(fixed, eos=True) == "eos" and reason(fixed, stop=True) == "stop"  # no env: a turn end ends it
    assert reason(fixed, eos=True, env=env()) is None  # with an env the environment answers the turn
    asked.clear()
    assert reason(fixed, "\\boxed{4}", eos=True, env=env("mine")) == "answer" and not asked  # the answer rule first
    assert reason(fixed, eos=True, env=env("mine")) == "mine" and asked
    assert reason(fixed, eos=False, depth=3, env=env()) == "depth"
    assert reason(turn, eos=False, env=env()) == "max_tokens"  # a turn cut by its cap
    assert reason(turn, eos=True, env=env()) is None
    assert reason(fixed, length=24, depth=2, eos=True, env=env()) == "max_tokens"  # env turns filled the budget
