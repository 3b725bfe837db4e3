"""Configuration dataclasses: one set drives the Python API and the command line.

Every field carries a help string (`metadata["help"]`) that `treepo rollout --help` prints, and
`__post_init__` rejects impossible values with a message that names the field and the fix.
Defaults are sized for a small model on a CPU; the paper's training values are given in brackets.

One module per stage it configures:
- `engine`: EngineConfig (the model, embedded or on a server, and token sampling);
- `sampler`: SamplerConfig (the tree), JobSamplerConfig / TrainSamplerConfig, the estimator names;
- `rollout`: RolloutConfig (the `treepo rollout` job) and EasyTaskConfig (train's and eval's problems);
- `reward`: RewardConfig; `eval`: EvalConfig; `train`: TrainConfig; `sync`: WeightSyncConfig.
"""

from .engine import EngineConfig
from .eval import EvalConfig
from .reward import RewardConfig
from .rollout import (
    DEFAULT_SYSTEM_PROMPT,
    DEFAULT_TRAIN_POOL,
    DEFAULT_TRAIN_SYSTEM_PROMPT,
    EASY_TASK,
    EASY_TASK_ARGS,
    EasyTaskConfig,
    RolloutConfig,
)
from .sampler import (
    AUTO_FANOUT_MAX,
    TREE_ESTIMATORS,
    DivergencePolicy,
    Estimator,
    JobSamplerConfig,
    SamplerConfig,
    TrainSamplerConfig,
    Whitening,
)
from .sync import WeightSyncConfig
from .train import TrainConfig

__all__ = [
    "AUTO_FANOUT_MAX",
    "DEFAULT_SYSTEM_PROMPT",
    "DEFAULT_TRAIN_POOL",
    "DEFAULT_TRAIN_SYSTEM_PROMPT",
    "DivergencePolicy",
    "EASY_TASK",
    "EASY_TASK_ARGS",
    "EasyTaskConfig",
    "EngineConfig",
    "Estimator",
    "EvalConfig",
    "JobSamplerConfig",
    "RewardConfig",
    "RolloutConfig",
    "SamplerConfig",
    "TREE_ESTIMATORS",
    "TrainConfig",
    "TrainSamplerConfig",
    "WeightSyncConfig",
    "Whitening",
]
