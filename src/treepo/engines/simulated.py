"""A model-free engine with a known answer-length law, for measuring what a sampler config does.

`HazardEngine(hazard)` ends every sampled token with EOS with probability `hazard` (a geometric answer
length, mean 1 / hazard, cut at the response budget); the tokens themselves are meaningless. Each
node's segment is a deterministic function of (seed, group, node id), so results do not depend on
request order. With hazard 0 every segment runs to its full length: the structural bound
(`rollout.accounting.bound_saving_ratio`) runs the sampler on it.

    engine = HazardEngine(hazard=1 / 48, seed=0)
    trees = TreeSampler(SamplerConfig(width=8, depth=4, segment_len=32), engine).rollout([[0]] * 64).trees

`hazard` may also be a sequence, one EOS probability per response position (the last one repeats):
any answer-length law, e.g. `hazards_from_lengths` of lengths that cluster around a typical answer
length or that have a heavy tail. A node's tokens start at its path's response offset, so a child drawn
after a prefix of l tokens continues the same law given L > l: the renewal model of answer lengths.

Because the policy's law is known, a tree's statistics can be checked against the truth: e.g. the share
of answers of at most t tokens is 1 - (1 - hazard)^t under the policy, whatever the tree's leaves say.
"""

from __future__ import annotations

import random
import zlib
from typing import Sequence, Union

from .base import EngineStats, SegmentOutput, SegmentRequest


class HazardEngine:
    """`Engine` with no model: each token is EOS with probability `hazard`."""

    max_context = 1 << 62
    tokenizer = None

    def __init__(self, hazard: Union[float, Sequence[float]] = 0.0, seed: int = 0) -> None:
        rates = [float(hazard)] if isinstance(hazard, (int, float)) else [float(h) for h in hazard]
        if not rates or not all(0.0 <= h <= 1.0 for h in rates) or rates[-1] >= 1.0:
            raise ValueError(f"hazard={hazard}: give probabilities in [0, 1] (the last one below 1).")
        self.hazard, self.rates, self.seed = hazard, rates, seed
        self.stats = EngineStats()

    def rate(self, position: int) -> float:
        """P(EOS at response position `position` | the answer got that far)."""
        return self.rates[min(position, len(self.rates) - 1)]

    def generate(self, requests: Sequence[SegmentRequest]) -> list[SegmentOutput]:
        self.stats.generate_calls += 1
        outs = []
        for r in requests:
            n, eos = r.max_new_tokens, False
            if any(self.rates):
                rng = random.Random(zlib.crc32(repr((self.seed, r.group, r.node_id)).encode()))
                start = sum(len(chunk) for chunk in r.context[1:])  # the path's response offset
                for k in range(r.max_new_tokens):
                    if rng.random() < self.rate(start + k):
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


def hazards_from_lengths(pmf: Sequence[float]) -> list[float]:
    """Per-position EOS probabilities of the answer-length law P(L = l + 1) = pmf[l] (normalised here):
    h(l) = P(L = l + 1) / P(L > l). The table ends every answer by its length; one rate of 0.5 is appended
    for the engine's positions past it, which the law never reaches."""
    total = float(sum(pmf))
    alive, rates = 1.0, []
    for p in pmf:
        p /= total
        rates.append(min(p / alive, 1.0) if alive > 1e-12 else 1.0)
        alive -= p
    return rates + [0.5]
