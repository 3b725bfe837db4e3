"""Tree data: the explicit, serialisable record of one prompt's rollout.

A node is one segment. Its id is the tuple of child indices from the root, so `(0, 1, 1)` is
the second child of the second child of the root's first child; the root (the prompt) is `()`.
Two trajectories whose leaf ids share the first k elements share their first k segments token
for token, and that is the grouping the tree advantage uses. Ids are tuples, never joined
strings (the released TreePO code concatenated them without a separator).

Environment turns (`treepo.envs`) are nodes too, flagged `env=True`: tokens an environment
appended after a model segment (a tool result, a user follow-up). They are context for what
follows (`context`, `response_ids`, `start` offsets and a trajectory's `segment_ends` include
them) but were never decoded (`decoded_tokens`, `leaf_tokens` skip them) and are never trained on
(`Trajectory.loss_mask` is False on them, their log-probs and entropies are stored as 0.0). An env
node is always the only child of the model segment it answers, with index 0, so `(0, 0, 1)` can be
"first segment, its env turn, the second branch grown after it"; the tree keeps forking below env
nodes, never between a model segment and its env turn. `model_path` drops the env levels for the
advantage estimators, whose subgroups would otherwise count the same leaves twice. Every leaf is a
model segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

from .errors import InputError

NodeId = tuple[int, ...]
ROOT: NodeId = ()

# Why a path ended. The sampler records the first rule that matched (first match wins: see `rollout.stopping.classify`).
# 'stop': a stop string ended the turn and no environment answers; 'max_turns': the path reached
# the most assistant turns; 'env_done': the environment ended the episode (`next_turn` gave None);
# 'env_error': an environment hook raised or returned something malformed. An environment's
# `check_finished` may also give reasons of its own.
FINISH_REASONS = ("answer", "eos", "max_tokens", "depth", "repetition", "stop", "max_turns", "env_done", "env_error")


@dataclass
class Node:
    """One segment: the tokens generated after its parent's context (or an environment turn, `env=True`)."""

    id: NodeId
    token_ids: list[int]
    logprobs: list[float]
    entropies: list[float]
    text: str = ""
    start: int = 0  # offset of the segment's first token in the response: its tokens are [start, end)
    hit_eos: bool = False
    finish_reason: Optional[str] = None  # set when the path ends at this node (a leaf)
    fallback: bool = False  # created by backtracking from finished paths
    env: bool = False  # tokens appended by the environment: context, never decoded, never trained on
    hit_stop: bool = False  # the segment ended at a stop string (which ends the assistant turn)

    @property
    def ends_turn(self) -> bool:
        """A model segment that closed its assistant turn (EOS / end-of-turn token or a stop string)."""
        return not self.env and (self.hit_eos or self.hit_stop)

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
            "env": self.env,
            "hit_stop": self.hit_stop,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Node":
        return cls(**{**d, "id": tuple(d["id"])})  # files written before env / hit_stop existed get False


@dataclass
class Trajectory:
    """A root-to-leaf path: prompt + the segments along it. Built from the tree by `PromptTree.trajectory`."""

    prompt_index: int
    node_path: NodeId
    token_ids: list[int]
    logprobs: list[float]
    entropies: list[float]
    segment_ends: list[int]  # offsets into token_ids where each node on the path ends (env turns included)
    finish_reason: str
    text: str
    reward: Optional[float] = None
    loss_mask: list[bool] = field(default_factory=list)  # one per token: False on environment tokens
    turns: int = 1  # assistant turns on the path (env turns + 1)

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
            "loss_mask": self.loss_mask,
            "turns": self.turns,
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
    # Budget 'particles' (and independent sampling): node id -> the particles on the path through it; a
    # leaf's count is its multiplicity (rollout/particles.py). Empty for the 'transfer' / 'branch' budgets,
    # whose leaves count once each.
    particles: dict[NodeId, int] = field(default_factory=dict)

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
        """Every token after the prompt on the path, environment turns included."""
        return [t for n in self.path(node_id) for t in n.token_ids]

    def model_turn_ids(self, node_id: NodeId) -> list[list[int]]:
        """The model's tokens on the path, one list per assistant turn (env turns separate them)."""
        turns: list[list[int]] = [[]]
        for n in self.path(node_id):
            if n.env:
                turns.append([])
            else:
                turns[-1].extend(n.token_ids)
        return turns

    def fork_points(self, leaf: NodeId) -> list[NodeId]:
        """Strict ancestors of `leaf` where new branches may grow, root side first.

        The prompt, every env turn, and every model segment that did not close its assistant turn;
        never a segment that closed its turn (after it comes the environment's reply, not more of
        the model). With fixed segments and no environment that is every strict ancestor; in turn
        mode it is the turn boundaries.
        """
        return [leaf[:k] for k in range(len(leaf)) if k == 0 or not self.nodes[leaf[:k]].ends_turn]

    def model_path(self, leaf: NodeId) -> tuple[NodeId, list[int]]:
        """(the leaf id without its env levels, tokens per model segment) for the advantage estimators.

        An env node is the only child of the segment it answers, so dropping its level keeps ids
        unique and keeps the subgroups (without it, 'average' would count the segment's subgroup
        twice). Each env turn's tokens are counted with the segment it answers, so per-token
        advantages still line up with `response_ids`; those tokens are masked out of the loss.
        """
        ids: list[int] = []
        lengths: list[int] = []
        for n in self.path(leaf):
            if n.env:
                lengths[-1] += len(n)
            else:
                ids.append(n.id[-1])
                lengths.append(len(n))
        return tuple(ids), lengths

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
            loss_mask=[not n.env for n in nodes for _ in n.token_ids],
            turns=1 + sum(n.env for n in nodes),
        )

    def trajectories(self) -> Iterator[Trajectory]:
        for leaf in self.leaves:
            yield self.trajectory(leaf)

    def multiplicity(self) -> Optional[list[int]]:
        """Per leaf (in `leaves` order), the particles it stands for; None when the tree has no particles."""
        return [self.particles[leaf] for leaf in self.leaves] if self.particles else None

    def leaf_counts(self) -> list[int]:
        """Per leaf, the trajectories it stands for: its multiplicity, or 1 in a tree without particles."""
        return self.multiplicity() or [1] * len(self.leaves)

    @property
    def group_size(self) -> int:
        """Trajectories the group stands for: the particles (width) of a particle tree, else its leaves."""
        return sum(self.leaf_counts())

    # -- accounting ------------------------------------------------------------------------
    def model_tokens(self, leaf: NodeId) -> int:
        """The model's tokens on a leaf's path (env turns excluded): its answer length for the accounting."""
        return sum(map(len, self.model_turn_ids(leaf)))

    @property
    def particle_tokens(self) -> int:
        """sum over leaves of multiplicity x answer length: what `group_size` independent draws with exactly
        these answers would decode (= `leaf_tokens` for a tree without particles)."""
        return sum(m * self.model_tokens(leaf) for m, leaf in zip(self.leaf_counts(), self.leaves))

    @property
    def shared_tokens(self) -> int:
        """S: tokens that shared prefixes saved, sum over model nodes of (paths through it - 1) x its length,
        where a node's paths are the multiplicities of the leaves under it. decoded_tokens =
        particle_tokens - shared_tokens exactly (every node has a leaf below it)."""
        through: dict[NodeId, int] = {}
        for leaf, m in zip(self.leaves, self.leaf_counts()):
            for k in range(1, len(leaf) + 1):
                through[leaf[:k]] = through.get(leaf[:k], 0) + m
        return sum((through.get(i, 1) - 1) * len(n) for i, n in self.nodes.items() if not n.env)

    @property
    def decoded_tokens(self) -> int:
        """Unique generated tokens: every model segment was decoded once (env turns were not decoded)."""
        return sum(len(n) for n in self.nodes.values() if not n.env)

    @property
    def leaf_tokens(self) -> int:
        """What independent sampling decodes for the same leaves: the model tokens of every path.

        Independent sampling would run each trajectory's conversation on its own, decoding every
        model token on the path once per trajectory; env turns are prefilled there as here, so
        they count in neither figure. Without env turns this is the sum of response lengths.
        """
        return sum(self.model_tokens(leaf) for leaf in self.leaves)

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
            "particles": [[list(k), v] for k, v in self.particles.items()],
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
            particles={tuple(k): v for k, v in d.get("particles", [])},
        )


def check_tree(tree: PromptTree) -> None:
    """Refuse a tree whose node paths, offsets and tokens disagree (it cannot be trained on); say where."""
    for node_id, node in tree.nodes.items():
        where = f"prompt {tree.prompt_index}, node {list(node_id)}"
        if len(node.logprobs) != len(node.token_ids):
            raise InputError(f"{where}: {len(node.token_ids)} tokens but {len(node.logprobs)} log-probs; the tree "
                             "file is damaged: roll it out again.")
        if len(node_id) > 1 and node_id[:-1] not in tree.nodes:
            raise InputError(f"{where}: its parent {list(node_id[:-1])} is missing; the tree file is damaged: roll it "
                             "out again.")
        expected = 0 if len(node_id) == 1 else tree.nodes[node_id[:-1]].end
        if node.start != expected:
            raise InputError(f"{where}: starts at response offset {node.start} but its path's segments end at "
                             f"{expected}; the node's path and tokens disagree: roll the tree out again.")
    for leaf in tree.leaves:
        if leaf not in tree.nodes:
            raise InputError(f"prompt {tree.prompt_index}: leaf {list(leaf)} has no node; roll the tree out again.")


def child_shares(leaves: Sequence[NodeId], multiplicity: Optional[Sequence[int]] = None) -> dict[NodeId, float]:
    """Per node (below the root) with a leaf under it, its share of its parent: the weight its subtree gets
    in its parent's value.

    Without multiplicities: 1 / (the parent's number of children), each child an equal, independent draw
    of the parent's continuation. With them (budget 'particles'): the node's particles over its parent's,
    so each particle, an exact draw from the policy, counts once. Either way the shares of a node's
    children sum to 1 and the estimates built from them are unbiased (train/unbiased.py).
    """
    counts = list(multiplicity) if multiplicity is not None else None
    through: dict[NodeId, float] = {}
    children: dict[NodeId, set[NodeId]] = {}
    for i, leaf in enumerate(leaves):
        m = counts[i] if counts is not None else 1
        for k in range(len(leaf) + 1):
            through[leaf[:k]] = through.get(leaf[:k], 0) + m
            if k:
                children.setdefault(leaf[: k - 1], set()).add(leaf[:k])
    shares: dict[NodeId, float] = {}
    for parent, kids in children.items():
        for c in kids:
            shares[c] = through[c] / through[parent] if counts is not None else 1.0 / len(kids)
    return shares


def leaf_weights(leaves: Sequence[NodeId], multiplicity: Optional[Sequence[int]] = None) -> list[float]:
    """Per leaf, the product of the shares (`child_shares`) along its path: they sum to 1 over a tree.

    Without multiplicities that is the product over the strict ancestors of 1 / (their number of
    children): each node's children are independent draws of its continuation, so a mean over a tree's
    leaves weighted by these is an unbiased estimate of the policy's mean (see `train/unbiased.py`).
    With multiplicities (budget 'particles') it is multiplicity / width: the weighted leaves are the
    width particles, each an exact draw. Children are counted from the leaf ids (env levels dropped or
    not, as the ids given).
    """
    shares = child_shares(leaves, multiplicity)
    out = []
    for leaf in leaves:
        w = 1.0
        for k in range(1, len(leaf) + 1):
            w *= shares[leaf[:k]]
        out.append(w)
    return out
