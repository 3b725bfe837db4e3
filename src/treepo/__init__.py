"""treepo: TreePO tree-structured rollouts and RL training for Hugging Face causal LMs.

    from treepo import EngineConfig, SamplerConfig, TreeSampler, load_engine

    engine = load_engine(EngineConfig(model="smollm2"))
    trees = TreeSampler(SamplerConfig(width=8, depth=4, segment_len=32), engine).rollout([prompt_ids]).trees

    from treepo import RewardConfig, TrainConfig, run_train

    run_train(EngineConfig(), SamplerConfig(), RewardConfig(), TrainConfig(steps=12, out="runs/train"))

One module per piece: `tree` (data), `sampler` (the TreePO loop), `stopping` (when a path ends),
`engines` (generators behind one protocol), `accounting` (savings), `advantages`, `loss`,
`policy` (training forward), `rewards`, `trainer`, `checkpoint`, `evaluate`, `metrics`, `plots`,
`prompts`, `rollout` (the job), `render` (pictures), `cli`.
"""

from .accounting import bound_saving_ratio, summarize
from .advantages import grpo_advantage, segment_advantages, token_advantages, tree_advantage, whiten
from .config import EngineConfig, EvalConfig, RewardConfig, RolloutConfig, SamplerConfig, TrainConfig
from .engines.base import Engine, EngineStats, SegmentOutput, SegmentRequest
from .errors import ConfigError, InputError, TreepoError
from .models import load_engine, load_model
from .sampler import RolloutResult, TreeSampler
from .tree import Node, NodeId, PromptTree, Trajectory
from .loss import ppo_loss
from .rewards import build_reward
from .trainer import Trainer, run_train
from .evaluate import evaluate, run_eval

__all__ = [
    "ConfigError",
    "EvalConfig",
    "RewardConfig",
    "TrainConfig",
    "Trainer",
    "build_reward",
    "evaluate",
    "grpo_advantage",
    "ppo_loss",
    "run_eval",
    "run_train",
    "segment_advantages",
    "token_advantages",
    "tree_advantage",
    "whiten",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "InputError",
    "Node",
    "NodeId",
    "PromptTree",
    "RolloutConfig",
    "RolloutResult",
    "SamplerConfig",
    "SegmentOutput",
    "SegmentRequest",
    "Trajectory",
    "TreeSampler",
    "TreepoError",
    "bound_saving_ratio",
    "load_engine",
    "load_model",
    "summarize",
]
__version__ = "0.1.0"
