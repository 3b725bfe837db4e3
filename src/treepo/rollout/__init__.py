"""Rollout: growing each prompt's tree of segments (or independent samples) and accounting for it.

- `sampler`: the TreePO loop (`TreeSampler`): fork, decode a segment for every active path, classify,
  branch, fall back;
- `stopping`: when a path ends (the answer predicate, repetition, the rule order);
- `accounting`: what a rollout decoded, against its leaves and the structural bound;
- `job`: the `treepo rollout` command (prompts in, files and a summary out).
"""
