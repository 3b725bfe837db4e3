"""Test helper: training steps on a tiny model with a rollout that depends only on the prompt.

    python tests/dist_train.py --prompts P.jsonl --out DIR                      # one process
    accelerate launch --multi_gpu --num_processes 2 tests/dist_train.py ...    # two (gloo on CPU)

Every prompt's tree is a pure function of its token ids, so one process and several draw the
same global batch and must reach the same parameters; each rank writes them to DIR/params-rankR.pt.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import zlib

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

import tiny  # noqa: E402
from treepo.config import EngineConfig, RewardConfig, SamplerConfig, TrainConfig  # noqa: E402
from treepo.rollout.sampler import RolloutResult  # noqa: E402
from treepo.train.trainer import Trainer  # noqa: E402
from treepo.tree import Node, PromptTree  # noqa: E402


def fixed_rollout(ids, first_index=0, indices=None, progress=0.0) -> RolloutResult:
    """Width 4, depth 2, segments of 2-6 tokens drawn from a seed made of the prompt's ids."""
    vocab = len(tiny.tokenizer())
    trees = []
    for k, prompt in enumerate(ids):
        rng = random.Random(zlib.crc32(bytes(str(list(prompt)), "ascii")))
        tree = PromptTree(prompt_index=first_index + k if indices is None else indices[k], prompt_ids=list(prompt))
        for node_id in [(0,), (1,), (0, 0), (0, 1), (1, 0), (1, 1)]:
            tokens = [rng.randrange(2, vocab) for _ in range(rng.randint(2, 6))]
            start = 0 if len(node_id) == 1 else tree.nodes[node_id[:1]].end
            tree.nodes[node_id] = Node(node_id, tokens, [0.0] * len(tokens), [1.0] * len(tokens), start=start,
                                       finish_reason="max_tokens" if len(node_id) == 2 else None)
        tree.leaves = [(0, 0), (0, 1), (1, 0), (1, 1)]
        trees.append(tree)
    return RolloutResult(trees, rounds=1, wall_seconds=0.001)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--packing", type=int, default=1)
    parser.add_argument("--mini-batches", type=int, default=1)
    parser.add_argument("--whiten", type=int, default=1)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    trainer = Trainer(
        EngineConfig(threads=1), SamplerConfig(width=4, depth=2, segment_len=6),
        RewardConfig(reward="toy_rewards:letter_share"),
        TrainConfig(prompts=args.prompts, num_prompts=8, steps=args.steps, prompts_per_step=args.prompts_per_step,
                    mini_batches=args.mini_batches, micro_batch_size=3, learning_rate=1e-3, out=args.out,
                    checkpoint_every=0, tensorboard=False, dynamic_sampling=False, packing=bool(args.packing),
                    whiten=bool(args.whiten)),
        model=tiny.model("llama"), tokenizer=tiny.tokenizer(),
    )
    trainer.sampler.rollout = fixed_rollout
    trainer.train()
    torch.save({k: v.detach().cpu() for k, v in trainer.policy.state_dict().items()},
               os.path.join(args.out, f"params-rank{trainer.rank}.pt"))
    trainer.accelerator.end_training()  # close the process group (as run_train does) before the process exits
    return 0


if __name__ == "__main__":
    sys.exit(main())
