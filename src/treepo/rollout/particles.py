"""The particle budget: a tree that can only decode fewer tokens than independent sampling.

Rule. Each prompt holds w particles (w = width). The root splits them as evenly as it can among its
root fan-out k children. A path that goes on after segment j keeps its m particles in one child, or,
at a fork point (j >= fork_depth) while m > 1, splits them as evenly as it can among min(b, m)
children (b = branching). A path that ends, for whatever reason, keeps its m particles as its leaf's
multiplicity. Nothing is handed on: a finished path's particles never go to the paths that survive
it, and there is no backtracking. How many children a node gets, and how its particles split, is
fixed by the particles above it before any of those children is drawn.

Why the weighted leaves are exact draws. Follow one particle: at the root it joins a child, which
the engine samples from the policy given the prompt; at every later node it joins one child, which
is again a fresh draw of the continuation given the path so far; it stops where that path ends. So
its trajectory is drawn from the policy exactly, whatever the other particles do: the split decides
*which* child a particle joins, never *what* the child contains. The w particles are therefore w
draws from the policy (dependent, since particles that share a node share its tokens, but each one
exact), and for any function f of a trajectory, (1/w) sum_leaf m(leaf) f(leaf) is an unbiased
estimate of E[f]: mean reward, accuracy, mean answer length. The same holds conditionally at every
node, which is what the unbiased estimator needs (train/unbiased.py, shares m(child) / m(parent)).

Why decoded <= independent. Let L_p be particle p's answer length. A node of length l that m(n)
particles pass through is decoded once, while the particles' own lengths count it m(n) times, so

    decoded = sum_p L_p - S,   S = sum_nodes (m(n) - 1) l(n) >= 0,

pathwise, for every tree. In expectation sum_p L_p = w E[L], the cost of w independent samples, so
E[decoded] = w E[L] - E[S] <= w E[L]: the identity `tree - independent = w (E_leaf[L] - E[L]) - S`
with its first term zero in expectation (E_leaf, the multiplicity-weighted leaf mean, is unbiased).
Budget transfer breaks exactly that first term: it gives finished paths' forks to the survivors, so
its leaves are the long answers.

What it costs. Particles that stay together until their path ends make one leaf: a group has at
most w distinct leaves, fewer when answers end before the forks that would separate them. How many
is the trade the adaptive shape (`shape.py`) makes, from the answer lengths it has seen; report the
distinct leaves beside every saving (rollout/accounting.py).
"""

from __future__ import annotations


def split_particles(m: int, parts: int) -> list[int]:
    """m particles over `parts` children as evenly as possible (the larger shares first); each gets >= 1."""
    if not 1 <= parts <= m:
        raise ValueError(f"cannot split {m} particles over {parts} children: need 1 <= children <= particles.")
    base, extra = divmod(m, parts)
    return [base + 1] * extra + [base] * (parts - extra)


def child_particles(m: int, depth: int, fork_depth: int, branching: int) -> list[int]:
    """The particles of each child of a path that goes on after its segment at model depth `depth` (>= 1).

    It forks into min(branching, m) children at a fork point (depth >= fork_depth, 0 meaning 1) while
    it holds more than one particle; otherwise its one child keeps all m.
    """
    if m > 1 and depth >= max(fork_depth, 1):
        return split_particles(m, min(branching, m))
    return [m]


def level_paths(width: int, root_fanout: int, branching: int, fork_depth: int, depth: int) -> list[int]:
    """Paths at each model depth 1..depth when none ends early: the tree's size level by level."""
    level = split_particles(width, root_fanout)
    sizes = [len(level)]
    for j in range(1, depth):
        level = [c for m in level for c in child_particles(m, j, fork_depth, branching)]
        sizes.append(len(level))
    return sizes
