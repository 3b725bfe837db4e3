"""treepo.integrations.trl against the real TRL: TreePOTrainer on a tiny random model.

Skipped without TRL >= 1.16 (pip install 'treepo[trl]'), unless TREEPO_REQUIRE_SERVER=1 (CI's test
path, `scripts/setup.sh --server`, installs the extra). One module-scoped run trains 2 steps (per-segment advantages, so the per-token path is exercised);
the tests read what it recorded: parameters moved, TRL got exactly num_generations completions per
prompt with the trees' ids and log-probs, the advantages TRL's loss used are treepo's own for the
same trees and rewards, and the reward function saw the dataset's extra columns as TRL passes them.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

if os.environ.get("TREEPO_REQUIRE_SERVER") == "1":  # CI's test path installs the extra: a missing TRL fails
    import datasets
    import trl
else:
    trl = pytest.importorskip("trl", minversion="1.16")
    datasets = pytest.importorskip("datasets")

from treepo import tiny  # noqa: E402
from treepo.errors import InputError  # noqa: E402
from treepo.integrations.trl import TreePOConfig, TreePOTrainer  # noqa: E402
from treepo.integrations.trl.rollout import prompt_groups, row_advantages  # noqa: E402
from treepo.train.update import build_samples  # noqa: E402
from treepo.tree import Node, PromptTree  # noqa: E402

WIDTH = 4


def small_args(tmp_path, **overrides) -> TreePOConfig:
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=WIDTH, num_generations=WIDTH,
                max_completion_length=12, treepo_depth=3, max_steps=2, learning_rate=1e-2, logging_steps=1,
                report_to="none", use_cpu=True, bf16=False, save_strategy="no", seed=3)
    return TreePOConfig(**{**base, **overrides})


def dataset():
    return datasets.Dataset.from_dict({
        "prompt": ["What is 12 plus 7?", "Count the letters in banana"] * 4,
        "answer": ["19", "6"] * 4,
        "level": [1, 2] * 4,
    })


class Recorder(TreePOTrainer):
    """Keeps every generation batch TRL's loss received."""

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        self.batches = getattr(self, "batches", []) + [(copy.deepcopy(self.treepo_last), out)]
        return out


CALLS: list[dict] = []


def reward_fn(prompts, completions, completion_ids, answer, level, **kwargs):
    """A TRL reward function with the usual signature and two extra dataset columns."""
    CALLS.append({"n": len(completions), "answer": list(answer), "level": list(level), "keys": set(kwargs),
                  "prompts": list(prompts)})
    return [float(len(ids) % 3) + (0.5 if a in c else 0.0) + 0.1 * lv
            for c, ids, a, lv in zip(completions, completion_ids, answer, level)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trl")
    CALLS.clear()
    model = tiny.model("llama")
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    # The paper's rule on a fixed shape: one row per leaf, trees from the first step (the particle rows are below).
    args = small_args(tmp, treepo_advantage="segment", treepo_whiten="scale", treepo_shape="fixed",
                      treepo_budget="transfer", treepo_init_divergence=2, treepo_init_divergence_max=-1)
    trainer = Recorder(model=model, reward_funcs=reward_fn, args=args, train_dataset=dataset(),
                       processing_class=tiny.tokenizer())
    trainer.train()
    return trainer, model, before


def test_particle_trees_reach_trl_as_num_generations_rows_with_treepos_advantages(tmp_path):
    """The default budget: a leaf holding m particles is m rows of the completions table, and the advantages TRL's
    loss gets are row_advantages of the same trees and rewards."""
    from treepo.integrations.trl.rollout import row_advantages

    args = small_args(tmp_path, treepo_shape="fixed", treepo_depth=3, treepo_init_divergence=1)
    trainer = Recorder(model=tiny.model("llama"), reward_funcs=reward_fn, args=args, train_dataset=dataset(),
                       processing_class=tiny.tokenizer())
    trainer.train()
    for last, out in trainer.batches:
        (tree,) = last["trees"]
        assert sum(tree.multiplicity()) == WIDTH == out["completion_ids"].shape[0]
        rows = [leaf for leaf, m in zip(tree.leaves, tree.multiplicity()) for _ in range(m)]
        for row, leaf in enumerate(rows):
            ids = tree.response_ids(leaf)
            assert out["completion_ids"][row, : len(ids)].tolist() == ids
        expected = row_advantages(copy.deepcopy(last["trees"]), last["rewards"], "unbiased", "scale")
        for row, a in enumerate(expected):
            assert out["advantages"][row, : len(a)].tolist() == pytest.approx(a, rel=1e-5, abs=1e-6)


def test_two_steps_move_the_parameters_and_log_tree_metrics(run):
    trainer, model, before = run
    moved = max(float((before[k] - v.detach()).abs().max()) for k, v in model.named_parameters())
    assert moved > 0
    assert trainer.state.global_step == 2
    logged = [row for row in trainer.state.log_history if "treepo/decoded_tokens" in row]
    assert len(logged) == 2
    for row in logged:
        assert 0 < row["treepo/decoded_tokens"] <= row["treepo/leaf_tokens"]
        assert 1 <= row["treepo/depth_mean"] <= row["treepo/depth_max"] <= 3
        assert row["treepo/trl_generation"] == 0 and "treepo/fallbacks" in row


def test_trl_gets_num_generations_completions_with_the_trees_ids_and_logprobs(run):
    trainer, _, _ = run
    assert len(trainer.batches) == 2
    for last, out in trainer.batches:
        (tree,) = last["trees"]  # per_device_train_batch_size = width: one prompt per generation
        assert len(tree.leaves) == WIDTH and out["completion_ids"].shape[0] == WIDTH
        for row, leaf in enumerate(tree.leaves):
            ids = tree.response_ids(leaf)
            n = len(ids)
            assert out["completion_ids"][row, :n].tolist() == ids
            assert out["completion_mask"][row].sum() == n
            assert torch.allclose(out["sampling_per_token_logps"][row, :n],
                                  torch.tensor(tree.trajectory(leaf).logprobs), atol=1e-6)
            assert out["prompt_ids"][row][out["prompt_mask"][row].bool()].tolist() == tree.prompt_ids


def test_advantages_trl_uses_are_treepos_own_for_the_same_trees_and_rewards(run):
    trainer, _, _ = run
    varied = False
    for last, out in trainer.batches:
        trees = copy.deepcopy(last["trees"])
        for t in trees:
            t.rewards = {leaf: r for leaf, r in zip(t.leaves, last["rewards"])}
        expected = build_samples(trees, "segment", "scale")
        adv = out["advantages"]
        assert adv.dim() == 2 and adv.shape == out["completion_ids"].shape
        for row, s in enumerate(expected):
            n = len(s.advantages)
            assert adv[row, :n].tolist() == pytest.approx(s.advantages, abs=1e-6)
            assert adv[row, n:].abs().sum() == 0
            varied |= len(set(round(a, 6) for a in s.advantages)) > 1
    assert varied, "per-segment advantages should differ between a path's segments somewhere"


def test_reward_function_gets_the_extra_columns_as_trl_passes_them(run):
    assert CALLS and all(c["n"] == WIDTH for c in CALLS)
    for c in CALLS:
        assert len(set(c["answer"])) == 1 and len(c["level"]) == WIDTH  # one prompt's group
        assert {"trainer_state", "log_metric", "log_extra"} <= c["keys"]
        assert c["answer"][0] == {1: "19", 2: "6"}[c["level"][0]]


@pytest.mark.parametrize("overrides, words", [
    (dict(treepo_width=3), ["treepo_width=3", "num_generations=4"]),
    (dict(min_p=0.1), ["min_p", "min_p=None"]),
    (dict(repetition_penalty=1.2), ["repetition_penalty", "1.0"]),
    (dict(use_vllm=True, vllm_mode="colocate"), ["vllm_mode", "server"]),
    (dict(multi_objective_aggregation="normalize_then_sum"), ["sum_then_normalize"]),
    (dict(treepo_advantage="best"), ["treepo_advantage", "unbiased"]),
    (dict(treepo_branching=0), ["branching", "treepo_"]),
    (dict(treepo_on_unsupported="maybe"), ["treepo_on_unsupported", "'trl'"]),
    (dict(generation_kwargs={"num_beams": 2}), ["generation_kwargs", "drop"]),
    (dict(use_vllm=True, vllm_mode="server", treepo_divergence_policy="entropy"), ["entropy", "fixed_avg"]),
])
def test_bad_configs_fail_in_post_init_with_the_fix(tmp_path, overrides, words):
    with pytest.raises(ValueError) as e:
        small_args(tmp_path, **overrides)
    for w in words:
        assert w in str(e.value)


def test_each_process_must_hold_whole_trees(tmp_path, monkeypatch):
    monkeypatch.setattr(TreePOConfig, "world_size", property(lambda self: 2))  # 2 x 2 rows: TRL's check passes
    with pytest.raises(ValueError, match="each process must hold whole trees"):
        small_args(tmp_path, per_device_train_batch_size=2)


def test_config_defaults_follow_trl_fields(tmp_path):
    args = small_args(tmp_path, max_completion_length=10, treepo_depth=3)
    assert args.treepo_width == WIDTH and args.treepo_segment_len == 4  # ceil(10 / 3)
    cfg = args.treepo_sampler_config()
    assert cfg.width == WIDTH and cfg.response_budget == 10
    assert args.treepo_whitening == "scale" and small_args(tmp_path, treepo_advantage="grpo").treepo_whitening == "none"


def test_trainer_refuses_grpo_config_and_rollout_func(tmp_path):
    from trl import GRPOConfig

    kw = dict(model=tiny.model("llama"), reward_funcs=reward_fn, train_dataset=dataset(),
              processing_class=tiny.tokenizer())
    with pytest.raises(TypeError, match="TreePOConfig"):
        TreePOTrainer(args=GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False), **kw)
    with pytest.raises(ValueError, match="rollout_func"):
        TreePOTrainer(args=small_args(tmp_path), rollout_func=lambda p, t: {}, **kw)


def test_a_model_the_engine_cannot_run_is_refused_or_falls_back_with_a_logged_reason(tmp_path, monkeypatch, caplog):
    import treepo.integrations.trl.trainer as mod

    def broken(*a, **k):
        raise InputError("gemma3: layers with different cache shapes")

    monkeypatch.setattr(mod, "TransformersEngine", broken)
    kw = dict(reward_funcs=reward_fn, train_dataset=dataset(), processing_class=tiny.tokenizer())
    with pytest.raises(ValueError, match="cannot run this setup: gemma3.*treepo_on_unsupported='trl'"):
        TreePOTrainer(model=tiny.model("llama"), args=small_args(tmp_path), **kw)
    with caplog.at_level("WARNING"):
        trainer = TreePOTrainer(model=tiny.model("llama"), args=small_args(tmp_path, treepo_on_unsupported="trl",
                                                                           max_steps=1), **kw)
    assert "TreePO is off" in caplog.text and "gemma3" in caplog.text
    trainer.train()
    rows = [r for r in trainer.state.log_history if "treepo/trl_generation" in r]
    assert rows and rows[0]["treepo/trl_generation"] == 1


def test_an_old_trl_is_refused_with_the_version_it_needs(monkeypatch):
    import treepo.integrations.trl as adapter

    monkeypatch.setattr(trl, "__version__", "1.15.2")
    with pytest.raises(ImportError, match=r"TRL >= 1\.16.*1\.15\.2"):
        adapter._check_trl()


def test_prompt_groups_need_whole_runs():
    assert prompt_groups([[1, 2]] * 2 + [[3]] * 2, 2) == [[1, 2], [3]]
    with pytest.raises(RuntimeError, match="not one prompt repeated"):
        prompt_groups([[1], [2], [1], [2]], 2)
    with pytest.raises(RuntimeError, match="not a multiple"):
        prompt_groups([[1]] * 3, 2)


def _tree(rewards_len=3) -> PromptTree:
    t = PromptTree(prompt_index=0, prompt_ids=[5])
    t.nodes[(0,)] = Node((0,), [7, 8], [-0.1, -0.2], [0.0, 0.0])
    for k in range(rewards_len):
        t.nodes[(0, k)] = Node((0, k), [9 + k], [-0.3], [0.0], start=2, finish_reason="eos")
        t.leaves.append((0, k))
    return t


def test_row_advantages_zero_an_unscorable_completion():
    advs = row_advantages([_tree()], [1.0, math.nan, 0.0], "unbiased", "none")
    assert [len(a) for a in advs] == [3, 3, 3]
    assert advs[1] == [0.0, 0.0, 0.0] and any(advs[0]) and any(advs[2])
    with pytest.raises(ValueError, match="one per completion"):
        row_advantages([_tree()], [1.0], "average", "none")


def test_every_treepo_field_has_help():
    from dataclasses import fields

    ours = [f for f in fields(TreePOConfig) if f.name.startswith("treepo_")]
    assert len(ours) >= 12
    for f in ours:
        assert len(f.metadata.get("help", "")) > 10, f"TreePOConfig.{f.name} has no help string"


def test_the_example_script_trains_a_step_on_the_tiny_model(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "trl_treepo.py"
    text = path.read_text()
    assert text.count("  # TreePO\n") == 2 and "# from trl import GRPOConfig, GRPOTrainer" in text
    spec = importlib.util.spec_from_file_location("trl_treepo_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    seen = []
    score = example.correctness

    def recording(prompts, completions, answer, **kw):  # the example's prompts are conversational
        seen.append((prompts, completions))
        return score(prompts, completions, answer, **kw)

    recording.__name__ = "correctness"
    example.correctness = recording
    trainer = example.main(["--tiny", "--max-steps", "1", "--output-dir", str(tmp_path / "ex")])
    assert trainer.state.global_step == 1 and isinstance(trainer, TreePOTrainer)
    # As TRL passes them for a conversational dataset: prompts and completions are message lists.
    prompts, completions = seen[0]
    assert all(isinstance(p, list) and p[-1]["role"] == "user" for p in prompts)
    assert all(isinstance(c, list) and c[0]["role"] == "assistant" and isinstance(c[0]["content"], str)
               for c in completions)
    assert example.correctness(None, [[{"content": "so \\boxed{7}"}], "\\boxed{8}"], ["7", "7"]) == [1.0, 0.0]


# -- vLLM server mode, against a fake of TRL's vLLM server routes ---------------------------------
@pytest.fixture
def fake_vllm(monkeypatch):
    """The fake server, with TRL's vLLM client allowed without vllm installed and its NCCL setup skipped."""
    import trl.generation.vllm_client as client_mod
    import trl.generation.vllm_generation as gen_mod

    from fake_trl_vllm import FakeTRLVLLM

    monkeypatch.setattr(client_mod, "is_vllm_available", lambda: True)
    monkeypatch.setattr(gen_mod, "is_vllm_available", lambda: True)
    monkeypatch.setattr(client_mod.VLLMClient, "init_communicator", lambda self, device=0: None)
    syncs = []
    monkeypatch.setattr(gen_mod.VLLMGeneration, "sync_weights", lambda self: syncs.append(1))
    fake = FakeTRLVLLM(vocab=len(tiny.tokenizer()))
    fake.syncs = syncs
    yield fake
    fake.stop()


def test_vllm_engine_grows_trees_through_trls_client(fake_vllm):
    from trl.generation.vllm_client import VLLMClient

    from treepo.config import SamplerConfig
    from treepo.integrations.trl.vllm import VLLMServerEngine
    from treepo.rollout.sampler import TreeSampler

    engine = VLLMServerEngine(VLLMClient(base_url=fake_vllm.url), tiny.tokenizer(), temperature=1.0, top_p=1.0,
                              top_k=0, eos_ids=[1], max_context=512)
    sampler = TreeSampler(SamplerConfig(width=4, depth=3, segment_len=4, init_divergence=2, answer_policy="none"),
                          engine)
    (tree,) = sampler.rollout([[5, 6, 7]]).trees
    assert len(tree.leaves) == 4
    sent = [p for body in fake_vllm.requests for p in body["prompt"]]
    for node_id, node in tree.nodes.items():  # each segment was asked for with its full context as the prompt
        context = [t for chunk in tree.context(node_id[:-1]) for t in chunk]
        assert context in sent
    answered = {tuple(c["prompt_token_ids"]) + tuple(c["token_ids"]): c["logprobs"]["token_logprobs"]
                for a in fake_vllm.answers for c in a["choices"]}
    leaf = tree.leaves[0]
    last = tree.nodes[leaf]
    key = tuple(t for chunk in tree.context(leaf[:-1]) for t in chunk) + tuple(last.token_ids)
    assert answered[key] == pytest.approx(last.logprobs)


def test_trainer_in_vllm_server_mode_trains_with_tree_completions(fake_vllm, tmp_path):
    model = tiny.model("llama")
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    args = small_args(tmp_path, use_vllm=True, vllm_mode="server", vllm_server_base_url=fake_vllm.url,
                      treepo_answer_policy="none")
    trainer = Recorder(model=model, reward_funcs=reward_fn, args=args, train_dataset=dataset(),
                       processing_class=tiny.tokenizer())
    trainer.train()
    assert trainer.state.global_step == 2 and len(fake_vllm.syncs) == 2  # TRL's weight sync, once per step
    assert max(float((before[k] - v.detach()).abs().max()) for k, v in model.named_parameters()) > 0
    for last, out in trainer.batches:
        (tree,) = last["trees"]
        assert out["completion_ids"].shape[0] == WIDTH and "importance_sampling_ratio" in out
        for row, leaf in enumerate(tree.leaves):
            n = len(tree.response_ids(leaf))
            assert torch.allclose(out["sampling_per_token_logps"][row, :n],
                                  torch.tensor(tree.trajectory(leaf).logprobs), atol=1e-6)
    assert fake_vllm.requests and all(body["n"] == 1 for body in fake_vllm.requests)


def test_a_trl_whose_hooks_changed_is_refused_at_import():
    from treepo.integrations.trl.trainer import check_hooks

    class Changed:
        def _generate_single_turn(self, prompts, sampling_params):
            pass

    with pytest.raises(ImportError, match=r"_generate_single_turn.*TRL 1\.16"):
        check_hooks(Changed)


class PeftChecker(TreePOTrainer):
    """Right after each generation (before the update): the sampled log-probs against the model with and
    without its adapters, teacher-forced on the first tree's first trajectory."""

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        tree = self.treepo_last["trees"][0]
        traj = next(tree.trajectories())
        ids = torch.tensor([tree.prompt_ids + traj.token_ids], device=self.model.device)
        n, target = len(traj.token_ids), torch.tensor(traj.token_ids)[:, None]
        with torch.no_grad():
            adapted = torch.log_softmax(self.model(ids).logits[0, -n - 1 : -1].float().cpu(), -1)
            with self.model.disable_adapter():
                bare = torch.log_softmax(self.model(ids).logits[0, -n - 1 : -1].float().cpu(), -1)
        mine = torch.tensor(traj.logprobs)
        self.gaps = getattr(self, "gaps", []) + [
            (float((adapted.gather(-1, target).squeeze(-1) - mine).abs().max()),
             float((bare.gather(-1, target).squeeze(-1) - mine).abs().max()))]
        return out


def test_a_peft_lora_model_trains_with_tree_completions_that_include_the_adapter(tmp_path):
    """TRL's peft_config path: the trees are sampled with the adapters in the forward, and only they train."""
    peft = pytest.importorskip("peft")
    base = tiny.model("llama")
    frozen = {k: v.detach().clone() for k, v in base.named_parameters()}
    args = small_args(tmp_path, max_steps=2, learning_rate=5e-2)
    trainer = PeftChecker(model=base, reward_funcs=reward_fn, args=args, train_dataset=dataset(),
                          processing_class=tiny.tokenizer(),
                          peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    assert isinstance(trainer.model, peft.PeftModel)
    lora_before = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_" in k}
    trainer.train()
    lora_after = dict(trainer.model.named_parameters())
    assert lora_before and any(not torch.equal(lora_after[k], v) for k, v in lora_before.items())
    base_now = {k.removeprefix("base_model.model."): v for k, v in trainer.model.named_parameters()}
    assert all(torch.equal(base_now[k.replace(".weight", ".base_layer.weight")] if k not in base_now else base_now[k],
                           v) for k, v in frozen.items())  # the base weights never move
    # Each step's trees were sampled with the adapters in the forward (random, non-zero LoRA weights from
    # the start, then trained ones): the adapted model gives back the sampled log-probs, the bare base does not.
    print("max |sampled - teacher-forced| log-prob per step, (adapted, bare):", trainer.gaps)
    assert len(trainer.gaps) == 2
    assert all(adapted < 1e-3 and bare > 10 * max(adapted, 1e-5) for adapted, bare in trainer.gaps)


def test_two_processes_under_accelerate_launch_train_whole_trees_per_rank(tmp_path):
    """`accelerate launch --num_processes 2` (gloo on CPU): each rank grows its own prompts' trees, the
    gradients are averaged, so both ranks end with the same parameters, moved from the start."""
    import json
    from pathlib import Path

    from test_distributed import _launch

    _launch(2, [str(Path(__file__).parent / "dist_trl.py"), "--out", str(tmp_path)], timeout=400)
    zero, one = (torch.load(tmp_path / f"params-rank{r}.pt") for r in (0, 1))
    trees = [json.loads((tmp_path / f"trees-rank{r}.json").read_text()) for r in (0, 1)]
    assert [t["processes"] for t in trees] == [2, 2]
    # Each rank grew its own trees (its own prompts' or its own draws); the same parameters afterwards then
    # mean the gradients were averaged, not that both ranks did the same work.
    assert all(len(step) == 1 for t in trees for step in t["trees"])  # one whole tree per rank and step
    assert trees[0]["trees"] != trees[1]["trees"]
    start = tiny.model("llama").state_dict()
    assert all(torch.allclose(zero[k], one[k], atol=1e-6) for k in zero)
    assert max(float((zero[k] - start[k]).abs().max()) for k in zero) > 0
    log = [row for row in json.loads((tmp_path / "log.json").read_text()) if "treepo/decoded_tokens" in row]
    assert len(log) == 2 and all(row["treepo/trl_generation"] == 0 for row in log)
