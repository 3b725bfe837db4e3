"""Tree data: the explicit, serialisable record of one prompt's rollout.

A node is one segment. Its id is the tuple of child indices from the root, so `(0, 1, 1)` is
the second child of the second child of the root's first child; the root (the prompt) is `()`.
Two trajectories whose leaf ids share the first k elements share their first k segments token
for token, and that is the grouping the tree advantage uses. Ids are tuples, never joined
strings (the released TreePO code concatenated them without a separator).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

NodeId = tuple[int, ...]
ROOT: NodeId = ()

# Why a path ended. The sampler records the first rule that matched (spec section 2, step 3).
FINISH_REASONS = ("answer", "eos", "max_tokens", "depth", "repetition")


@dataclass
class Node:
    """One segment: the tokens generated after its parent's context."""

    id: NodeId
    token_ids: list[int]
    logprobs: list[float]
    entropies: list[float]
    text: str = ""
    start: int = 0  # offset of the segment's first token in the response: its tokens are [start, end)
    hit_eos: bool = False
    finish_reason: Optional[str] = None  # set when the path ends at this node (a leaf)
    fallback: bool = False  # created by backtracking from finished paths

    @property
    def parent(self) -> NodeId:
        return self.id[:-1]

    @property
    def depth(self) -> int:
        return len(self.id)

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": list(self.id),
            "token_ids": self.token_ids,
            "logprobs": self.logprobs,
            "entropies": self.entropies,
            "text": self.text,
            "start": self.start,
            "hit_eos": self.hit_eos,
            "finish_reason": self.finish_reason,
            "fallback": self.fallback,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Node":
        return cls(**{**d, "id": tuple(d["id"])})


@dataclass
class Trajectory:
    """A root-to-leaf path: prompt + the segments along it. Built from the tree by `PromptTree.trajectory`."""

    prompt_index: int
    node_path: NodeId
    token_ids: list[int]
    logprobs: list[float]
    entropies: list[float]
    segment_ends: list[int]  # offsets into token_ids where each segment ends
    finish_reason: str
    text: str
    reward: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_index": self.prompt_index,
            "node_path": list(self.node_path),
            "token_ids": self.token_ids,
            "logprobs": self.logprobs,
            "entropies": self.entropies,
            "segment_ends": self.segment_ends,
            "finish_reason": self.finish_reason,
            "text": self.text,
            "reward": self.reward,
        }


@dataclass
class PromptTree:
    """All segments grown for one prompt, and which of them are leaves (the trajectories)."""

    prompt_index: int
    prompt_ids: list[int]
    prompt_text: str = ""
    answer: Optional[str] = None
    nodes: dict[NodeId, Node] = field(default_factory=dict)
    leaves: list[NodeId] = field(default_factory=list)  # in the order the paths finished
    root_fanout: int = 0
    fallbacks: int = 0  # backtracking rounds
    rewards: dict[NodeId, float] = field(default_factory=dict)  # leaf id -> reward, once scored
    metadata: dict[str, Any] = field(default_factory=dict)

    # -- structure -------------------------------------------------------------------------
    def path(self, node_id: NodeId) -> list[Node]:
        """The nodes from the root's child down to `node_id`."""
        return [self.nodes[node_id[:k]] for k in range(1, len(node_id) + 1)]

    def children(self, node_id: NodeId) -> list[NodeId]:
        k = len(node_id)
        return sorted(i for i in self.nodes if len(i) == k + 1 and i[:k] == node_id)

    def next_child_index(self, node_id: NodeId) -> int:
        """A child index not used yet under `node_id` (fallback branches must not reuse ids)."""
        kids = self.children(node_id)
        return kids[-1][-1] + 1 if kids else 0

    def response_ids(self, node_id: NodeId) -> list[int]:
        return [t for n in self.path(node_id) for t in n.token_ids]

    def context(self, node_id: NodeId) -> list[list[int]]:
        """Token chunks a child of `node_id` is generated after: the prompt, then each segment."""
        return [self.prompt_ids] + [n.token_ids for n in self.path(node_id)]

    # -- trajectories ----------------------------------------------------------------------
    def trajectory(self, leaf: NodeId, text: Optional[str] = None) -> Trajectory:
        nodes = self.path(leaf)
        ends, total = [], 0
        for n in nodes:
            total += len(n)
            ends.append(total)
        return Trajectory(
            prompt_index=self.prompt_index,
            node_path=leaf,
            token_ids=[t for n in nodes for t in n.token_ids],
            logprobs=[x for n in nodes for x in n.logprobs],
            entropies=[x for n in nodes for x in n.entropies],
            segment_ends=ends,
            finish_reason=nodes[-1].finish_reason or "",
            text=text if text is not None else "".join(n.text for n in nodes),
            reward=self.rewards.get(leaf),
        )

    def trajectories(self) -> Iterator[Trajectory]:
        for leaf in self.leaves:
            yield self.trajectory(leaf)

    # -- accounting ------------------------------------------------------------------------
    @property
    def decoded_tokens(self) -> int:
        """Unique generated tokens: every segment was decoded once."""
        return sum(len(n) for n in self.nodes.values())

    @property
    def leaf_tokens(self) -> int:
        """What independent sampling decodes for the same leaves: the sum of response lengths."""
        return sum(len(self.response_ids(leaf)) for leaf in self.leaves)

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_index": self.prompt_index,
            "prompt_ids": self.prompt_ids,
            "prompt_text": self.prompt_text,
            "answer": self.answer,
            "nodes": [n.to_dict() for n in sorted(self.nodes.values(), key=lambda n: n.id)],
            "leaves": [list(leaf) for leaf in self.leaves],
            "root_fanout": self.root_fanout,
            "fallbacks": self.fallbacks,
            "rewards": [[list(k), v] for k, v in self.rewards.items()],
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PromptTree":
        nodes = [Node.from_dict(n) for n in d["nodes"]]
        return cls(
            prompt_index=d["prompt_index"],
            prompt_ids=d["prompt_ids"],
            prompt_text=d.get("prompt_text", ""),
            answer=d.get("answer"),
            nodes={n.id: n for n in nodes},
            leaves=[tuple(leaf) for leaf in d["leaves"]],
            root_fanout=d.get("root_fanout", 0),
            fallbacks=d.get("fallbacks", 0),
            rewards={tuple(k): v for k, v in d.get("rewards", [])},
            metadata=d.get("metadata", {}),
        )
