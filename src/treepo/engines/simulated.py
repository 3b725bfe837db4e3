"""A model-free engine with a known answer-length law, for measuring what a sampler config does.

`HazardEngine(hazard)` ends every sampled token with EOS with probability `hazard` (a geometric answer
length, mean 1 / hazard, cut at the response budget); the tokens themselves are meaningless. Each
node's segment is a deterministic function of (seed, group, node id), so results do not depend on
request order. With hazard 0 every segment runs to its full length: the structural bound
(`rollout.accounting.bound_saving_ratio`) runs the sampler on it.

    engine = HazardEngine(hazard=1 / 48, seed=0)
    trees = TreeSampler(SamplerConfig(width=8, depth=4, segment_len=32), engine).rollout([[0]] * 64).trees

Because the policy's law is known, a tree's statistics can be checked against the truth: e.g. the share
of answers of at most t tokens is 1 - (1 - hazard)^t under the policy, whatever the tree's leaves say.
"""

from __future__ import annotations

import random
import zlib
from typing import Sequence

from .base import EngineStats, SegmentOutput, SegmentRequest


class HazardEngine:
    """`Engine` with no model: each token is EOS with probability `hazard`."""

    max_context = 1 << 62
    tokenizer = None

    def __init__(self, hazard: float = 0.0, seed: int = 0) -> None:
        if not 0.0 <= hazard < 1.0:
            raise ValueError(f"hazard={hazard}: must be in [0, 1).")
        self.hazard, self.seed = hazard, seed
        self.stats = EngineStats()

    def generate(self, requests: Sequence[SegmentRequest]) -> list[SegmentOutput]:
        self.stats.generate_calls += 1
        outs = []
        for r in requests:
            n, eos = r.max_new_tokens, False
            if self.hazard > 0:
                rng = random.Random(zlib.crc32(repr((self.seed, r.group, r.node_id)).encode()))
                for k in range(r.max_new_tokens):
                    if rng.random() < self.hazard:
                        n, eos = k + 1, True
                        break
            self.stats.decode_tokens += n
            outs.append(SegmentOutput([1] * n, [0.0] * n, [0.0] * n, eos))
        return outs

    def release(self, group: int) -> None:
        pass

    def decode(self, token_ids) -> str:
        return ""

    def reseed(self, seed: int) -> None:
        self.seed = seed
