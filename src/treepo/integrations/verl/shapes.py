"""The adaptive tree shape across a verl worker's trees (no verl import).

`treepo train` grows all of a step's prompts in one `TreeSampler.rollout`, whose `AdaptiveShape`
chooses the step's shape from the answer lengths of the last steps. Under verl each prompt's tree is
grown on its own, so the agent loop worker keeps one `StepShapes` per kind of tree (width and sampling
parameters: a greedy validation pass is another policy's lengths): the first tree of a training step
fixes that step's shape from the lengths of the worker's previous steps (independent sampling while
none are seen), and every finished tree's leaves join its step's lengths. Thread-safe: trees finish
on the sampler threads.
"""

from __future__ import annotations

import threading
from typing import Hashable, Optional

from ...config import SamplerConfig
from ...rollout.shape import AdaptiveShape, TreeShape, adaptive_applies
from ...tree import PromptTree


class StepShapes:
    """One adaptive shape per training step, learnt from the worker's earlier steps."""

    def __init__(self, cfg: SamplerConfig):
        self.shaper = AdaptiveShape(cfg)
        self.step: Optional[Hashable] = None
        self.shape: Optional[TreeShape] = None
        self.trees: list[PromptTree] = []  # the current step's finished trees
        self.lock = threading.Lock()

    def shape_for(self, step: Hashable) -> TreeShape:
        """The shape every tree of `step` grows (the steps come in order in a synchronous trainer)."""
        with self.lock:
            if step != self.step:
                if self.trees:
                    self.shaper.history.observe(self.trees)  # the last step's lengths, one rollout of history
                self.step, self.shape, self.trees = step, self.shaper.next_shape(), []
            assert self.shape is not None
            return self.shape

    def finished(self, step: Hashable, tree: PromptTree) -> None:
        with self.lock:
            if step == self.step:
                self.trees.append(tree)


_shapes: dict[Hashable, StepShapes] = {}
_lock = threading.Lock()


def step_shape(cfg: SamplerConfig, kind: Hashable, step: Hashable) -> tuple[Optional[TreeShape], Optional[StepShapes]]:
    """(the shape this tree grows, its shapes to report the finished tree to); (None, None) for a fixed shape."""
    if not adaptive_applies(cfg):
        return None, None
    with _lock:
        shapes = _shapes.setdefault(kind, StepShapes(cfg))
    return shapes.shape_for(step), shapes
