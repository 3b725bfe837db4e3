"""The verl adapter's tests: run in .venv-verl (verl pins transformers < 5.11), driven by tests/test_verl.py."""

from __future__ import annotations

from pathlib import Path

import pytest

VERL_CONFIG = Path(__import__("verl").__file__).parent / "trainer" / "config"
TREEPO_LINES = ["trainer.use_v1=True", "trainer.v1.trainer_mode=treepo",
                "actor_rollout_ref.rollout.agent.default_agent_loop=treepo_tree", "algorithm.adv_estimator=treepo",
                "actor_rollout_ref.rollout.name=vllm", "actor_rollout_ref.rollout.n=4",
                "actor_rollout_ref.rollout.prompt_length=64", "actor_rollout_ref.rollout.response_length=32"]


def compose(overrides: list[str]):
    """verl's own ppo_trainer config with these Hydra overrides, as `python -m verl.trainer.main_ppo` builds it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(VERL_CONFIG), version_base=None):
        return hydra_compose(config_name="ppo_trainer", overrides=overrides)


@pytest.fixture
def treepo_config():
    return lambda *extra: compose(TREEPO_LINES + list(extra))
