"""A verl config treepo cannot honour stops at start-up with the setting and the fix; the plugin is found
through verl's entry point in a fresh process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from treepo.errors import ConfigError
from treepo.integrations.verl.settings import check_config


def test_the_four_lines_give_treepos_tree(treepo_config):
    s = check_config(treepo_config("+treepo.segment_len=8"), where="test")
    assert (s.sampler.width, s.sampler.segment_len, s.sampler.depth) == (4, 8, 4)  # depth = response_length / segment
    assert (s.advantage, s.whitening, s.sampler.shape, s.sampler.budget) == ("unbiased", "scale", "adaptive", "particles")
    paper = check_config(treepo_config("algorithm.adv_estimator=treepo_paper", "+treepo.segment_len=8"), where="test")
    assert paper.advantage == "average" and paper.round_timeout == 0
    assert check_config(treepo_config("+treepo.segment_len=8", "+treepo.round_timeout=600"), where="t").round_timeout == 600


@pytest.mark.parametrize("overrides,match", [
    (["trainer.v1.trainer_mode=separate_async"], r"trainer.v1.trainer_mode=separate_async.*trainer_mode=treepo"),
    (["trainer.v1.trainer_mode=colocate_async"], r"trainer_mode=colocate_async"),
    (["trainer.use_v1=False"], r"trainer.use_v1 is off"),
    (["actor_rollout_ref.rollout.agent.default_agent_loop=single_turn_agent"], r"default_agent_loop=single_turn_agent.*treepo_tree"),
    (["algorithm.adv_estimator=grpo"], r"algorithm.adv_estimator=grpo.*treepo or treepo_paper"),
    (["actor_rollout_ref.rollout.name=trtllm"], r"rollout.name=trtllm.*token-id generation"),
    (["+treepo.width=8"], r"treepo.width.*actor_rollout_ref.rollout.n"),
    (["++treepo.segment_len=16", "+treepo.depth=4"], r"64 response tokens exceeds actor_rollout_ref.rollout.response_length=32"),
    (["+treepo.env=calculator"], r"treepo.env.*single-turn"),
    (["+treepo.init_divergence=2"], r"init_divergence=2 contradicts --shape adaptive"),
    (["+treepo.segmnt_len=8"], r"treepo.segmnt_len: not a treepo setting"),
    (["+treepo.round_timeout=-5"], r"treepo.round_timeout=-5.*seconds >= 0"),
    (["+treepo.branching=0"], r"the treepo block.*branching"),
    (["actor_rollout_ref.rollout.multi_turn.enable=True"], r"multi_turn.enable"),
    (["actor_rollout_ref.rollout.full_determinism=True"], r"full_determinism=True"),
    (["actor_rollout_ref.rollout.max_model_len=80"], r"max_model_len=80 is below prompt_length \+ response_length = 96"),
    (["actor_rollout_ref.rollout.val_kwargs.n=2", "+treepo.rep_count=1"], r"rep_count=1"),
])
def test_a_config_treepo_cannot_honour_is_refused_naming_the_setting(treepo_config, overrides, match):
    with pytest.raises(ConfigError, match=match):
        check_config(treepo_config("+treepo.segment_len=8", *overrides), where="test")


def test_validation_of_another_width_samples_independently(treepo_config):
    """val_kwargs.n (1 by default) is not the tree width: validation draws independently, whatever the tree's fan-out."""
    from treepo.integrations.verl.settings import validation_sampler

    s = check_config(treepo_config("+treepo.segment_len=8", "+treepo.shape=fixed", "+treepo.init_divergence=4"), where="t")
    val = validation_sampler(s.sampler, 1)
    assert (val.width, val.mode, val.segment_len, val.depth) == (1, "independent", 8, 4)


def test_every_problem_is_named_at_once(treepo_config):
    with pytest.raises(ConfigError) as e:
        check_config(treepo_config("+treepo.segment_len=8", "algorithm.adv_estimator=gae",
                                   "actor_rollout_ref.rollout.name=hf"), where="test")
    assert "adv_estimator=gae" in str(e.value) and "rollout.name=hf" in str(e.value)


def test_the_plugin_is_found_through_the_entry_point_in_a_fresh_process():
    """`import verl` alone (as in each Ray worker) registers the agent loop, the estimators and the trainer mode."""
    code = ("import verl\n"
            "from verl.experimental.agent_loop.agent_loop import _agent_loop_registry as loops\n"
            "from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY as est\n"
            "from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY as modes\n"
            "print(loops['treepo_tree']['_target_'], est['treepo'].__module__, est['treepo_paper'].__module__,"
            " modes['treepo'].__module__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["treepo.integrations.verl.agent_loop.TreeAgentLoop",
                                  "treepo.integrations.verl.estimators", "treepo.integrations.verl.estimators",
                                  "treepo.integrations.verl.trainer"]
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "VERL_USE_EXTERNAL_PLUGINS": "none"})
    assert off.returncode != 0 and "KeyError" in off.stderr  # so the registration above came from the entry point


def test_the_check_command_runs_verls_validation_and_treepos():
    base = [sys.executable, "-m", "treepo.integrations.verl", "trainer.use_v1=True", "trainer.v1.trainer_mode=treepo",
            "algorithm.adv_estimator=treepo"]
    verl_says = subprocess.run(base, capture_output=True, text=True, timeout=300)  # verl's own check comes first
    assert verl_says.returncode == 2 and "verl refuses this config" in verl_says.stdout and "micro_batch" in verl_says.stdout
    treepo_says = subprocess.run(base + ["actor_rollout_ref.actor.use_dynamic_bsz=True"], capture_output=True,
                                 text=True, timeout=300)
    assert treepo_says.returncode == 2 and "default_agent_loop" in treepo_says.stdout


def test_the_version_range_checked_at_import_is_the_one_setup_installs():
    import tomllib
    from pathlib import Path

    from treepo.integrations.verl import BELOW_VERL, MIN_VERL

    spec = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["tool"]["treepo"]["verl"]
    assert spec == f"verl[verl-core]>={MIN_VERL},<{BELOW_VERL}"
