"""The engine protocol: what the sampler asks of any generator.

One call, `generate`, decodes one segment for every request in a batch. A request names its
prompt (`group`) and the node it creates; its context is given as token chunks (the prompt, then
each ancestor segment, environment turns included), so

- an engine with its own KV cache (the embedded transformers engine) continues a child from its
  parent's cache by the parent's id, and prefills only what it does not hold;
- a stateless engine (an OpenAI-compatible server) sends the concatenated token ids and lets the
  server's prefix cache do the sharing.

`release(group)` tells an engine a prompt's tree is complete, so it may drop that prompt's cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

from ..tree import NodeId


@dataclass(frozen=True)
class SegmentRequest:
    """Generate the segment of node `node_id` of prompt `group`."""

    group: int
    node_id: NodeId
    context: tuple[tuple[int, ...], ...]  # (prompt ids, segment of node_id[:1], ..., of node_id[:-1])
    max_new_tokens: int
    # Strings that end the segment where they appear in its text. A hint: an engine may stop there to
    # save work; the sampler cuts the segment at the first one whatever the engine returns.
    stop: tuple[str, ...] = ()

    @property
    def parent_id(self) -> NodeId:
        return self.node_id[:-1]

    def context_ids(self) -> list[int]:
        return [t for chunk in self.context for t in chunk]


@dataclass
class SegmentOutput:
    """Tokens of one generated segment with their sampled log-probs and the sampling entropies.

    Log-probs are of the sampling distribution before truncation: log_softmax(logits / T) at the
    sampled token (T = 1 for greedy); the entropy is that distribution's entropy at each step.
    """

    token_ids: list[int]
    logprobs: list[float]
    entropies: list[float]
    hit_eos: bool


@dataclass
class EngineStats:
    """Work the engine really did, counted as it happened."""

    prefill_tokens: int = 0  # context tokens run through the model that it did not sample
    decode_tokens: int = 0  # sampled tokens handed back (unique segments' tokens)
    computed_decode_rows: int = 0  # decode positions computed, including rows already stopped
    forward_passes: int = 0
    generate_calls: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@runtime_checkable
class Engine(Protocol):
    """What `TreeSampler` needs. See `TransformersEngine` for the embedded implementation."""

    stats: EngineStats
    max_context: int  # most tokens (prompt + response) one sequence may hold
    tokenizer: object  # a transformers tokenizer: renders prompts (chat template) and decodes

    def generate(self, requests: Sequence[SegmentRequest]) -> list[SegmentOutput]:
        """Decode up to `max_new_tokens` for every request (stopping at EOS unless ignored), batched."""
        ...

    def release(self, group: int) -> None:
        """The tree of prompt `group` is complete: drop anything cached for it."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str:
        """Token ids -> text, with the engine's tokenizer."""
        ...

    def reseed(self, seed: int) -> None:
        """Restart the engine's token sampling random stream."""
        ...

    def rng_state(self) -> object:
        """The sampling random stream's state (checkpoints, and evaluations that must not shift it)."""
        ...

    def set_rng_state(self, state: object) -> None:
        ...

    def sync_weights(self) -> None:
        """The policy's weights changed: drop whatever was computed with the old ones."""
        ...
