"""Training: rewards on tree leaves -> advantages -> PPO update on the policy that rolled them out.

- `advantages`: tree, segment and GRPO advantages, and whitening (pure functions over node ids);
- `loss`: the PPO clip loss with clip-higher and dual clip;
- `logprobs`: batching trajectories and the flat log-prob forward pass;
- `packing`: tree-packed forward passes (one row of unique tokens per tree, tree attention mask);
- `update`: one policy update (old log-probs, micro-batches, gradient accumulation);
- `setup`: the checks a run settles before step 1, and its prompt stream;
- `checkpoint`: atomic checkpoints and resume;
- `trainer`: the loop (`Trainer`, `run_train`).
"""
