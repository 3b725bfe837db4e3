"""treepo's tree advantages as verl advantage estimators: `algorithm.adv_estimator=treepo` or `treepo_paper`.

verl 0.9.1 calls a registered estimator with the rows' token-level rewards, response mask, the
algorithm config and the prompt uids only; the tree of each prompt is not among them. The trainer
mode (`trainer.TreePOTrainer`) fetches the rows' tree metadata and hands it over for the length of
its advantage step (`tree_rows_for_step`); called without it (another trainer mode), the estimator
refuses, naming the setting to change.

    treepo        treepo train's default estimator ('unbiased'), or `treepo.advantage` when set
    treepo_paper  the paper's tree advantage (Eq. 5, 'average')
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from verl.trainer.ppo.core_algos import register_adv_est

from ...errors import ConfigError
from .settings import AGENT_LOOP, ESTIMATORS, TRAINER_MODE, TreeSettings
from .tree_rows import batch_advantages


@dataclass
class StepRows:
    """What one advantage step knows of its rows besides verl's tensors (batch order)."""

    uids: Sequence[str]
    fields: Sequence[dict]  # each row's extra_fields (tree metadata)
    responses: torch.Tensor  # [B, L] response token ids, right-padded
    settings: TreeSettings
    incomplete_rows: int = 0  # set by the estimator: rows of prompts that lost a row (advantage 0)


_STEP: ContextVar[Optional[StepRows]] = ContextVar("treepo_step_rows", default=None)


@contextlib.contextmanager
def tree_rows_for_step(rows: StepRows) -> Iterator[None]:
    token = _STEP.set(rows)
    try:
        yield
    finally:
        _STEP.reset(token)


def tree_advantages(name: str, token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                    index=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both [B, L], for verl's estimator `name` on the current step's trees."""
    step = _STEP.get()
    if step is None:
        raise ConfigError(f"algorithm.adv_estimator={name} needs the tree of every prompt, which only treepo's trainer "
                          f"mode hands over: set trainer.use_v1=True trainer.v1.trainer_mode={TRAINER_MODE} and "
                          f"actor_rollout_ref.rollout.agent.default_agent_loop={AGENT_LOOP}.")
    rows = token_level_rewards.shape[0]  # token_level_rewards, response_mask: [B, L]
    if len(step.fields) != rows or step.responses.shape[0] != rows:
        raise RuntimeError(f"the advantage step has {rows} rows but {len(step.fields)} rows of tree metadata: verl "
                           "reordered or filtered the batch between fetching it and estimating; report this.")
    if index is not None and [str(u) for u in index] != [str(u) for u in step.uids]:
        raise RuntimeError("the advantage step's uids are not the rows' whose tree metadata was fetched.")
    advantage = step.settings.advantage if name == "treepo" else ESTIMATORS[name]
    scores = token_level_rewards.sum(dim=-1)  # [B] each row's reward
    adv, step.incomplete_rows = batch_advantages(step.uids, step.fields, response_mask, step.responses, scores,
                                                 advantage, step.settings.whitening)  # [B, L]
    adv = adv.to(token_level_rewards.device) * response_mask
    return adv, adv


def _register(name: str) -> None:
    @register_adv_est(name)
    def estimator(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, config=None, index=None,
                  **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return tree_advantages(name, token_level_rewards, response_mask, index)

    estimator.__name__ = estimator.__qualname__ = f"treepo_{name}_advantage"


for _name in ESTIMATORS:
    _register(_name)
