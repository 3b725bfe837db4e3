"""treepo: TreePO tree-structured rollouts for Hugging Face causal LMs.

    from treepo import EngineConfig, SamplerConfig, TreeSampler, load_engine

    engine = load_engine(EngineConfig(model="smollm2"))
    trees = TreeSampler(SamplerConfig(width=8, depth=4, segment_len=32), engine).rollout([prompt_ids]).trees

One module per piece: `tree` (data), `sampler` (the TreePO loop), `stopping` (when a path ends),
`engines` (generators behind one protocol), `accounting` (savings), `prompts`, `rollout` (the
job), `render` (pictures), `cli`.
"""

from .accounting import bound_saving_ratio, summarize
from .config import EngineConfig, RolloutConfig, SamplerConfig
from .engines.base import Engine, EngineStats, SegmentOutput, SegmentRequest
from .errors import ConfigError, InputError, TreepoError
from .models import load_engine, load_model
from .sampler import RolloutResult, TreeSampler
from .tree import Node, NodeId, PromptTree, Trajectory

__all__ = [
    "ConfigError",
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
