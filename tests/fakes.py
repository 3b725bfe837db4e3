"""A scripted fake engine: deterministic segments per node id, no model.

Token ids 32..126 decode to their ASCII character; EOS is id 0 and decodes to nothing. By default a
node's segment is `max_new_tokens` letters drawn from a hash of (seed, group, node id), and its
first token is unique across the engine's life (id >= 1000, decoded as '#'), so two different
nodes never produce the same segment. A `script(request) -> dict | None` can override a node's
segment with {"text": str, "eos": bool}. Its tokenizer has no chat template: environment messages
render in the plain layout ("\n\nTool: 42\n\nAnswer:"), one token per character.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from treepo.engines.base import EngineStats, SegmentOutput, SegmentRequest

EOS = 0


def encode(text: str) -> list[int]:
    return [ord(c) for c in text]


class FakeTokenizer:
    """One token per character (ids 32..126), no chat template; EOS is id 0."""

    chat_template = None
    eos_token_id = EOS

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": encode(text)}

    def __len__(self) -> int:
        return 2000  # ids up to the unique first tokens (>= 1000) are in the vocabulary

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(t) if 32 <= t < 127 else ("" if t == EOS else "#") for t in token_ids)


@dataclass
class FakeEngine:
    script: Optional[Callable[[SegmentRequest], Optional[dict]]] = None
    max_context: int = 100_000
    unique_first_token: bool = True
    stats: EngineStats = field(default_factory=EngineStats)
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    calls: list[list[SegmentRequest]] = field(default_factory=list)
    generated: dict[tuple[int, tuple], list[int]] = field(default_factory=dict)
    released: list[int] = field(default_factory=list)
    seed: int = 0
    _counter: int = 1000

    def reseed(self, seed: int) -> None:
        self.seed = seed

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def _default(self, req: SegmentRequest) -> list[int]:
        h = hashlib.sha256(repr((self.seed, req.group, req.node_id)).encode()).digest()
        letters = [97 + h[i % len(h)] % 26 for i in range(req.max_new_tokens)]
        if self.unique_first_token:
            letters[0] = self._counter
            self._counter += 1
        return letters

    def generate(self, requests: Sequence[SegmentRequest]) -> list[SegmentOutput]:
        self.calls.append(list(requests))
        self.stats.generate_calls += 1
        outs = []
        for req in requests:
            key = (req.group, req.node_id)
            assert key not in self.generated, f"node {key} generated twice"
            override = self.script(req) if self.script else None
            if override is not None:
                tokens = encode(override.get("text", ""))[: req.max_new_tokens]
                eos = bool(override.get("eos")) and len(tokens) < req.max_new_tokens
                if eos:
                    tokens = tokens + [EOS]
                if not tokens:
                    tokens = [EOS]
                    eos = True
            else:
                tokens, eos = self._default(req), False
            self.generated[key] = tokens
            self.stats.decode_tokens += len(tokens)
            h = hashlib.sha256(repr(key).encode()).digest()
            outs.append(
                SegmentOutput(
                    token_ids=tokens,
                    logprobs=[-(h[i % 32] / 64.0) for i in range(len(tokens))],
                    entropies=[h[(i + 7) % 32] / 64.0 for i in range(len(tokens))],
                    hit_eos=eos,
                )
            )
        return outs

    def release(self, group: int) -> None:
        self.released.append(group)
