"""treepo: TreePO tree-structured rollouts and RL training for Hugging Face causal LMs.

    from treepo import EngineConfig, SamplerConfig, TreeSampler, load_engine

    engine = load_engine(EngineConfig(model="smollm2"))
    trees = TreeSampler(SamplerConfig(width=8, depth=4, segment_len=32), engine).rollout([prompt_ids]).trees

    from treepo import RewardConfig, TrainConfig, TrainSamplerConfig, run_train

    run_train(EngineConfig(), TrainSamplerConfig(), RewardConfig(), TrainConfig(steps=12, out="runs/train"))

The package reads as the pipeline:
- `tree` (the data: nodes, paths, leaves), `config` (every knob, one dataclass per job), `prompts`,
  `answers` (answer extraction), `plugins` (loading a user's 'module:name'), `errors`, `io`, `progress`;
- `engines/`: generators behind one protocol (embedded transformers engine, server engine, model loading);
- `envs/`: multi-turn environments;
- `rollout/`: the TreePO sampler, stopping rules, accounting, the `treepo rollout` job;
- `rewards/`: scorers, time limits, scoring trees;
- `train/`: advantages, loss, log-prob passes, tree packing, the update, the trainer, checkpoints;
- `eval/`: metrics, evaluation, the `treepo eval` job;
- `viz/`: tree pictures and plots;
- `cli`: the `treepo` command.
"""

from .config import (
    EngineConfig,
    EvalConfig,
    JobSamplerConfig,
    RewardConfig,
    RolloutConfig,
    SamplerConfig,
    TrainConfig,
    TrainSamplerConfig,
)
from .engines.base import Engine, EngineStats, SegmentOutput, SegmentRequest
from .engines.loading import load_engine, load_model
from .errors import ConfigError, InputError, TreepoError
from .eval.evaluate import evaluate
from .eval.job import run_eval
from .rewards.scorers import build_reward
from .rollout.accounting import bound_saving_ratio, summarize
from .rollout.sampler import RolloutResult, TreeSampler
from .train.advantages import grpo_advantage, segment_advantages, token_advantages, tree_advantage, whiten
from .train.loss import ppo_loss
from .train.trainer import Trainer, run_train
from .tree import Node, NodeId, PromptTree, Trajectory

__all__ = [
    "ConfigError",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "EvalConfig",
    "InputError",
    "JobSamplerConfig",
    "Node",
    "NodeId",
    "PromptTree",
    "RewardConfig",
    "RolloutConfig",
    "RolloutResult",
    "SamplerConfig",
    "SegmentOutput",
    "SegmentRequest",
    "TrainConfig",
    "TrainSamplerConfig",
    "Trainer",
    "Trajectory",
    "TreeSampler",
    "TreepoError",
    "bound_saving_ratio",
    "build_reward",
    "evaluate",
    "grpo_advantage",
    "load_engine",
    "load_model",
    "ppo_loss",
    "run_eval",
    "run_train",
    "segment_advantages",
    "summarize",
    "token_advantages",
    "tree_advantage",
    "whiten",
]
__version__ = "0.1.0"
