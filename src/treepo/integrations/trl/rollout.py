"""The TRL-facing side of a tree rollout, as plain functions (no TRL import, tested on their own).

TRL hands the trainer its generation batch as rows, each prompt repeated `num_generations` times in
a run of consecutive rows (its RepeatSampler). Here

- `prompt_groups` turns those rows into one prompt per tree (and checks the runs are whole);
- `completions`, `row_advantages` and `tree_metrics` (`treepo.integrations.rows`, shared with the verl
  adapter) turn the trees back into `num_generations` rows per prompt, each leaf repeated for the
  particles it holds, give each row treepo's advantages and say what to log.
"""

from __future__ import annotations

from typing import Sequence

from ..rows import completions, row_advantages, tree_metrics

__all__ = ["completions", "prompt_groups", "row_advantages", "tree_metrics"]


def prompt_groups(prompt_ids: Sequence[Sequence[int]], width: int) -> list[list[int]]:
    """One prompt per run of `width` identical consecutive rows; an error names a broken run."""
    if len(prompt_ids) % width:
        raise RuntimeError(
            f"the generation batch has {len(prompt_ids)} rows, not a multiple of num_generations={width}: "
            "each process must hold whole prompt groups (TreePOConfig checks per_device_train_batch_size * "
            "steps_per_generation; do not pass a custom sampler that splits them)."
        )
    groups = []
    for start in range(0, len(prompt_ids), width):
        run = [list(p) for p in prompt_ids[start : start + width]]
        if any(p != run[0] for p in run[1:]):
            raise RuntimeError(
                f"rows {start}..{start + width - 1} of the generation batch are not one prompt repeated "
                f"num_generations={width} times: TreePO grows each prompt's completions as one tree and needs "
                "TRL's RepeatSampler order (whole groups on one process)."
            )
        groups.append(run[0])
    return groups
