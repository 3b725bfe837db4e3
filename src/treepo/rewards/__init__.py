"""Rewards: scoring finished trajectories without letting a scorer crash or stall the run.

- `scorers`: the reward functions (`build_reward`: math_verify, reasoning_gym, a user's 'module:function');
- `timelimit`: how each call is bounded in time;
- `scoring`: scoring every leaf of a batch of trees, and DAPO's overlong penalty.
"""
