"""TreePO inside verl's Ray trainer: tree rollouts through verl's servers, tree advantages in its PPO step.

    pip install 'verl[vllm]>=0.9.1,<0.10'   # or verl[sglang]; verl[verl-core] to check configs on a laptop
    pip install --no-deps treepo            # treepo's transformers pin is above verl's: not `treepo[verl]`
    python -m verl.trainer.main_ppo ... \\
        trainer.use_v1=True trainer.v1.trainer_mode=treepo \\
        actor_rollout_ref.rollout.agent.default_agent_loop=treepo_tree \\
        algorithm.adv_estimator=treepo actor_rollout_ref.rollout.n=16 \\
        +treepo.segment_len=512 +treepo.depth=14

Nothing to import by hand: treepo registers itself through verl's `verl.plugins` entry point in every
Ray process (`plugin.py`). The pieces:

- `settings`: the config lines above, checked (a clear error names a setting treepo cannot honour);
- `engine`: treepo's engine protocol over verl's server client (token ids in and out, sticky routing);
- `agent_loop`: the `n` sessions of a prompt share one tree grown by treepo's own sampler;
- `tree_rows`: a tree as verl's rows (metadata in `extra_fields`) and back;
- `estimators`: `treepo` / `treepo_paper` for `algorithm.adv_estimator`;
- `trainer`: the `treepo` trainer mode (verl's sync trainer with the tree's advantage step).

The core package never imports verl; this package needs verl >= 0.9.1, < 0.10 (the versions whose
agent loop and trainer interfaces it was written against).
"""

from __future__ import annotations

MIN_VERL, BELOW_VERL = "0.9.1", "0.10"


def check_verl() -> str:
    """verl's version, or ImportError with the install command."""
    try:
        import verl
    except ImportError as e:
        raise ImportError("treepo.integrations.verl needs verl, which is not installed: pip install "
                          f"'verl[verl-core]>={MIN_VERL},<{BELOW_VERL}' (then treepo with --no-deps: docs/verl.md).") from e
    from packaging.version import Version

    if not Version(MIN_VERL) <= Version(verl.__version__) < Version(BELOW_VERL):
        raise ImportError(f"treepo.integrations.verl was written against verl {MIN_VERL} up to {BELOW_VERL}; this "
                          f"environment has verl {verl.__version__}: pip install 'verl[verl-core]>={MIN_VERL},<{BELOW_VERL}'.")
    return verl.__version__


check_verl()

from .settings import AGENT_LOOP, ESTIMATORS, TRAINER_MODE, check_config  # noqa: E402

__all__ = ["AGENT_LOOP", "ESTIMATORS", "TRAINER_MODE", "check_config", "check_verl"]
