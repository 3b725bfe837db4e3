"""The trainer mode `treepo` (`trainer.v1.trainer_mode=treepo`): verl's synchronous trainer, plus the tree.

Two additions to `PPOTrainerSync` (which it is, to verl: its `trainer_mode` reads "sync"), nothing else:

- at start-up it checks the whole config (`settings.check_config`): a setting treepo cannot honour
  stops the run before any worker starts, naming the setting and the fix;
- its advantage step fetches the rows' tree metadata (`extra_fields`) and response ids from
  TransferQueue and hands them to the tree estimators for the length of verl's own advantage step
  (KL-in-reward, rollout correction and the write-back stay verl's), and logs what the trees saved.

The second would be unnecessary if verl's `compute_advantage` passed `non_tensor_batch` (with the rows'
`extra_fields`) to every registered estimator, as it does for GDPO, and v1's `_compute_advantage`
fetched `extra_fields` with the other fields; the first, if verl let a plugin validate the config.
Synchronous only: in verl's async modes the weights can change between a tree's segments.
"""

from __future__ import annotations

import logging

import torch
import transfer_queue as tq
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

from .estimators import StepRows, tree_rows_for_step
from .settings import TRAINER_MODE, check_config
from .tree_rows import PAD_UID

log = logging.getLogger(__name__)
FETCH = ["uid", "extra_fields", "responses"]


def _column(data, key: str) -> list:
    value = data[key]
    return value.tolist() if hasattr(value, "tolist") else list(value)


def _padded(value) -> torch.Tensor:
    """[B, L] from TransferQueue's per-row (nested) tensor, right-padded with 0."""
    if getattr(value, "is_nested", False):
        return torch.nested.to_padded_tensor(value, 0)
    return value


def tree_step_metrics(uids, fields) -> dict[str, float]:
    """What the step's trees decoded against what `n` independent draws of the same answers would."""
    first = {}
    for uid, f in zip(uids, fields):
        if not str(uid).startswith(PAD_UID):  # verl's padding rows copy a real row's fields
            first.setdefault(str(uid), f)
    trees = list(first.values())
    decoded = sum(f["treepo_tree_decoded_tokens"] for f in trees)
    particle = sum(f["treepo_tree_particle_tokens"] for f in trees)
    return {
        "treepo/decoded_tokens": float(decoded),  # unique tokens the servers sampled for the trees
        "treepo/particle_tokens": float(particle),  # what n independent draws with exactly these answers decode
        # 1 - decoded / (n independent draws of exactly these answers); treepo's own saving_vs_own_leaves divides
        # by the distinct leaves' tokens instead, a smaller figure under particles
        "treepo/saving_vs_same_answers_drawn_independently": 1.0 - decoded / particle if particle else 0.0,
        "treepo/distinct_leaves_per_group": sum(f["treepo_tree_distinct_leaves"] for f in trees) / max(len(trees), 1),
        "treepo/cached_prompt_tokens": float(sum(f["treepo_tree_cached_prompt_tokens"] for f in trees)),
        "treepo/requests_per_tree": sum(f["treepo_tree_requests"] for f in trees) / max(len(trees), 1),
    }


@register_trainer(TRAINER_MODE)
class TreePOTrainer(PPOTrainerSync):
    """verl's synchronous PPO trainer with TreePO's start-up checks and tree advantage step."""

    # verl's base trainer tests `trainer_mode == "sync"` to choose the on-policy replay buffer, batch sizes and
    # checkpoint contents; this mode is that one, registered under another name.
    @property
    def trainer_mode(self) -> str:
        return "sync"

    @trainer_mode.setter
    def trainer_mode(self, value: str) -> None:
        pass  # verl sets it from trainer.v1.trainer_mode (= treepo)

    def __init__(self, config):
        self.treepo = check_config(config, where=f"trainer.v1.trainer_mode={TRAINER_MODE}")
        log.info("treepo: trees of width %d, %d segments of %d tokens, estimator %s, whitening %s",
                 self.treepo.sampler.width, self.treepo.sampler.depth, self.treepo.sampler.segment_len,
                 self.treepo.advantage, self.treepo.whitening)
        super().__init__(config)

    def _compute_advantage(self, batch, metrics: dict):
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=FETCH)
        uids, fields = _column(data, "uid"), _column(data, "extra_fields")
        rows = StepRows(uids, fields, _padded(data["responses"]), self.treepo)
        with tree_rows_for_step(rows):
            out = super()._compute_advantage(batch, metrics)
        metrics.update(tree_step_metrics(uids, fields))
        metrics["treepo/incomplete_tree_rows"] = float(rows.incomplete_rows)
        if rows.incomplete_rows:
            log.warning("treepo: %d rows belong to prompts that lost a row after their tree was grown (a reward or "
                        "TransferQueue failure; see the agent loop workers' logs): they get advantage 0 this step",
                        rows.incomplete_rows)
        return out
