"""TreePOTrainer under `accelerate launch` (tests/test_trl.py): tiny model, 2 steps; each rank writes its params."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import datasets
import torch

from treepo import tiny
from treepo.integrations.trl import TreePOConfig, TreePOTrainer


def reward(prompts, completions, completion_ids, **kwargs):
    return [float(len(ids) % 3) for ids in completion_ids]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    a = p.parse_args()
    out = Path(a.out)
    data = datasets.Dataset.from_dict({"prompt": ["What is 12 plus 7?", "Count the letters in banana"] * 8})
    args = TreePOConfig(output_dir=str(out / "trl"), per_device_train_batch_size=4, num_generations=4,
                        max_completion_length=12, treepo_depth=3, max_steps=2, learning_rate=1e-2, logging_steps=1,
                        report_to="none", use_cpu=True, bf16=False, save_strategy="no", seed=3)
    trees = []

    class Recording(TreePOTrainer):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            trees.append([[t.prompt_ids, [x.token_ids for x in t.trajectories()]] for t in self.treepo_last["trees"]])
            return out

    trainer = Recording(model=tiny.model("llama"), reward_funcs=reward, args=args, train_dataset=data,
                        processing_class=tiny.tokenizer())
    trainer.train()
    rank = trainer.accelerator.process_index
    model = trainer.accelerator.unwrap_model(trainer.model)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / f"params-rank{rank}.pt")
    (out / f"trees-rank{rank}.json").write_text(json.dumps({"processes": trainer.accelerator.num_processes,
                                                            "trees": trees}))
    if rank == 0:
        (out / "log.json").write_text(json.dumps(trainer.state.log_history))
    # As a multi-process script should: close the process group, or a gloo rank may abort at exit
    # ("terminate called without an active exception") after its work is done.
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
