"""The unbiased tree estimator: leaf weights and leave-one-out segment values.

Why. Tree leaves are not draws from the policy. A node forks only `b` ways and budget transfer gives
a finished path's forks to the paths that keep going, so long paths own more leaves than short ones:
a plain mean over a tree's leaves (accuracy, reward, GRPO's group baseline) is biased toward long
answers. This module gives every leaf the weight that undoes that, and per-segment advantages whose
weighted policy gradient is an unbiased estimate of the policy's gradient.

Setting. A prompt's tree has nodes n (segments; the root () is the prompt) with c(n) children each.
Every child of n is an independent draw of n's continuation from the policy, given the tokens so far,
and c(n) is fixed before those children are drawn (true of the fixed split and of budget transfer:
both decide from the outcomes of *other* paths; see fallback below). Write Q(n) for the policy's
expected reward after the prefix ending in n.

1. Values. V(leaf) = its reward; V(n) = mean over its children of V(child). By induction V(n) is an
   unbiased estimate of Q(n): given c(n), the children are iid draws, and each V(child) is unbiased
   for its Q by the induction hypothesis, so E[V(n)] = E[Q(child)] = Q(n).
2. Leaf weights. w(leaf) = prod over the leaf's strict ancestors a (the root included) of 1 / c(a).
   They sum to 1 over a tree, and sum_leaf w(leaf) R(leaf) = V(root): the weighted mean reward (or
   accuracy) over the leaves is an unbiased estimate of the policy's, whatever the tree's shape. For
   independent sampling (w chains under the root) every weight is 1/w: the plain mean.
3. Advantages. The policy gradient is sum_k E[(Q(s_k, seg_k) - b(s_k)) grad log pi(seg_k | s_k)] for
   any baseline b that does not depend on seg_k. For the children i = 1..c of node p, take V(i) for
   Q and, as the baseline, the leave-one-out mean of the siblings, B(i) = mean_{j != i} V(j) (it is
   built from draws independent of child i, so E[B(i) grad log pi(i)] = 0). The plain difference
   V(i) - V(p) = (c - 1)/c (V(i) - B(i)) would shrink node p's gradient by (c - 1)/c, which differs
   from node to node: that is why the leave-one-out form is used. A node with no sibling inherits
   its parent's baseline (built from the parent's siblings, also independent of it); under a root
   with one child the baseline is 0. So A(n) = V(n) - B(n), one value per segment, given to every
   token of the segment.
4. Weights in the loss. Summed over the leaves, sum_leaf w(leaf) sum_{segments n on its path} A(n)
   grad log pi(n) = sum_n W(n) A(n) grad log pi(n) with W(n) = sum of the leaf weights under n =
   prod over n's strict ancestors of 1 / c: exactly the unbiased node-level estimate of 3. The
   weights go into the per-token advantages, scaled by the group size (mean weight 1): PPO's clipped
   objective is linear in A for a positive factor, so this weighs each trajectory's loss by w.
   Re-centring the advantages afterwards (token whitening) would break this; divide by a scale only
   (`--whiten scale`) or not at all.
5. Independent sampling. The root has w chains, every weight is 1/w and A = R_i - mean_{j != i} R_j:
   the estimator is RLOO (leave-one-out REINFORCE), unbiased.

Fallback. Backtracking adds children to a node *after* its subtree has finished, and only when the
paths ended (e.g. with an answer) and the prompt is short of width: c(n) then depends on the outcomes
of n's own subtree (optional stopping), and point 1 no longer holds exactly. The sampler's `branch`
budget policy re-grows finished paths' budget at earlier points the same way. Measured on a scripted
engine with a known EOS hazard (tests/test_unbiased.py, benchmarks/sampler_bias.py), the weighted
estimates stay within their confidence intervals of the independent-sampling truth while the raw leaf
means are far off, but trees with fallback children carry a small residual bias that this derivation
does not rule out.

Particles (the default budget, `rollout/particles.py`). A prompt holds w particles; a fork splits a
node's m(n) particles among its children before they are drawn, and a leaf keeps its particles as its
multiplicity. Every particle's path is an exact draw from the policy, and every split is fixed before
the children it splits among are drawn, so points 1-4 hold with the child's share s(c) = m(c) / m(p) in
place of 1 / c(p): V(n) = sum_c s(c) V(c) (a fixed convex combination of unbiased estimates of Q(n)),
the leave-one-out baseline B(i) = sum_{j != i} s(j) V(j) / sum_{j != i} s(j) (independent of child i),
and the leaf weight prod s = m(leaf) / w: the weighted leaves are the w particles. There is no
fallback and no transfer: c(n) = min(b, m(n)) depends on nothing but the particles above n, so the
estimator is unbiased exactly (no optional stopping).
"""

from __future__ import annotations

from typing import Optional, Sequence

from ..tree import NodeId, child_shares, leaf_weights


def tree_values(leaves: Sequence[NodeId], rewards: Sequence[float], multiplicity: Optional[Sequence[int]] = None
                ) -> tuple[dict[NodeId, float], dict[NodeId, list[NodeId]], dict[NodeId, float]]:
    """(V for every node with a leaf below it, root () included; the children of every internal node;
    each node's share of its parent, `tree.child_shares`)."""
    shares = child_shares(leaves, multiplicity)
    children: dict[NodeId, list[NodeId]] = {}
    for leaf in leaves:
        for k in range(1, len(leaf) + 1):
            kids = children.setdefault(leaf[: k - 1], [])
            if leaf[:k] not in kids:
                kids.append(leaf[:k])
    value: dict[NodeId, float] = {leaf: float(r) for leaf, r in zip(leaves, rewards)}

    def v(node: NodeId) -> float:
        if node not in value:
            value[node] = sum(shares[c] * v(c) for c in children[node])
        return value[node]

    v(())
    return value, children, shares


def unbiased_advantages(leaves: Sequence[NodeId], rewards: Sequence[float],
                        multiplicity: Optional[Sequence[int]] = None) -> list[list[float]]:
    """Per leaf, one advantage per segment on its path: w(leaf) * len(leaves) * (V(n) - B(n)) (see above)."""
    value, children, shares = tree_values(leaves, rewards, multiplicity)
    baseline: dict[NodeId, float] = {(): 0.0}
    todo = [()]
    while todo:  # parents before children
        node = todo.pop()
        kids = children.get(node, [])
        total = sum(shares[c] * value[c] for c in kids)  # = V(node)
        for c in kids:
            rest = 1.0 - shares[c]  # the siblings' shares
            baseline[c] = (total - shares[c] * value[c]) / rest if len(kids) > 1 else baseline[node]
            if c in children:
                todo.append(c)
    weights = leaf_weights(leaves, multiplicity)
    n = len(leaves)
    return [[w * n * (value[leaf[:k]] - baseline[leaf[:k]]) for k in range(1, len(leaf) + 1)]
            for leaf, w in zip(leaves, weights)]
