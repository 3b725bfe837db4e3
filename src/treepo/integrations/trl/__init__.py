"""TreePO inside TRL's GRPOTrainer: tree rollouts and tree advantages for a TRL GRPO script.

    from treepo.integrations.trl import TreePOConfig, TreePOTrainer   # was: GRPOConfig, GRPOTrainer
    args = TreePOConfig(output_dir="out", num_generations=8, treepo_depth=4)
    trainer = TreePOTrainer(model=model, reward_funcs=reward_fn, args=args, train_dataset=dataset)
    trainer.train()

The dataset, reward functions, the rest of GRPOConfig, the PEFT config and the accelerate launch stay
as they are. Each prompt's `num_generations` completions are grown as one TreePO tree (treepo's
sampler on treepo's embedded engine, running the trainer's own model), and TRL's per-group
advantages are replaced by treepo's tree advantages; TRL's loss, importance ratio, reference KL and
logging run unchanged. See `trainer.py` for how the adapter hooks into GRPOTrainer and why there.

Needs TRL >= 1.16 (`pip install 'treepo[trl]'`).
"""

from __future__ import annotations

MIN_TRL = "1.16"


def _check_trl() -> None:
    try:
        import trl
    except ImportError as e:
        raise ImportError(
            f"treepo.integrations.trl needs TRL >= {MIN_TRL}, which is not installed: pip install 'treepo[trl]' "
            f"(or pip install 'trl>={MIN_TRL}')."
        ) from e
    from packaging.version import Version

    if Version(trl.__version__) < Version(MIN_TRL):
        raise ImportError(
            f"treepo.integrations.trl needs TRL >= {MIN_TRL}; this environment has TRL {trl.__version__}: "
            f"pip install -U 'trl>={MIN_TRL}'."
        )


_check_trl()

from .config import TreePOConfig  # noqa: E402
from .trainer import TreePOTrainer  # noqa: E402

__all__ = ["MIN_TRL", "TreePOConfig", "TreePOTrainer"]
