"""Evaluation: k samples per problem, scored as mean@k / pass@k / maj@k with bootstrap intervals.

- `metrics`: the estimators, pure functions over plain values;
- `evaluate`: sampling and scoring a problem set (used by `treepo eval` and by the trainer);
- `job`: the `treepo eval` command.
"""
