"""`python -m treepo.integrations.verl [overrides ...]`: is the plugin registered, and would this config run?

Prints where treepo is registered in verl (agent loop, estimators, trainer mode) in a fresh process,
as verl's Ray workers find it; with Hydra overrides, composes verl's ppo_trainer config with them and
runs verl's own config validation (what `python -m verl.trainer.main_ppo` runs first) and treepo's
start-up check, so a cluster job's config can be checked on a laptop, whatever its trainer mode.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    import verl  # noqa: F401  (loads the verl.plugins entry points, as every Ray process does)
    from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY

    from ...errors import ConfigError
    from . import AGENT_LOOP, ESTIMATORS, TRAINER_MODE, check_config

    found = {"agent loop": AGENT_LOOP in _agent_loop_registry,
             "estimators": all(e in ADV_ESTIMATOR_REGISTRY for e in ESTIMATORS),
             "trainer mode": TRAINER_MODE in TRAINER_REGISTRY}
    for what, ok in found.items():
        print(f"{what}: {'registered' if ok else 'MISSING'}")
    if not all(found.values()):
        print("treepo's verl plugin did not load: reinstall treepo (pip install -e '.[verl]') so that its "
              "verl.plugins entry point exists, and check VERL_USE_EXTERNAL_PLUGINS is not 'none'.")
        return 1
    if argv:
        from hydra import compose, initialize_config_dir
        from pathlib import Path

        config_dir = str(Path(verl.__file__).parent / "trainer" / "config")
        with initialize_config_dir(config_dir=config_dir, version_base=None):
            config = compose(config_name="ppo_trainer", overrides=argv)
        from verl.trainer.ppo.utils import need_critic, need_reference_policy
        from verl.utils.config import validate_config

        try:
            validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
        except Exception as e:  # verl raises assertions, ValueErrors and Hydra's instantiation errors
            print(f"verl refuses this config: {e}")
            return 2
        try:
            settings = check_config(config, where="python -m treepo.integrations.verl")
        except ConfigError as e:
            print(e)
            return 2
        print(f"config ok: width {settings.sampler.width}, {settings.sampler.depth} segments of "
              f"{settings.sampler.segment_len} tokens, estimator {settings.advantage}, whitening {settings.whitening}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
