"""A TRL GRPO script, switched to TreePO by two lines (marked `# TreePO`).

Everything else is what a TRL user already has: a dataset with a `prompt` column and extra
columns, a reward function with TRL's signature, GRPOConfig's fields, the model id, and
`accelerate launch examples/trl_treepo.py ...` for several GPUs (or plain `python`).

    python examples/trl_treepo.py                      # SmolLM2-135M-Instruct (treepo's local copy)
    python examples/trl_treepo.py --model Qwen/Qwen2.5-0.5B-Instruct --max-steps 50
    python examples/trl_treepo.py --tiny --max-steps 2 # a random tiny model: a smoke test in seconds

To go back to GRPO, undo the two lines: the import, and the treepo_ fields of the config.
"""

from __future__ import annotations

import argparse
import copy
import random
import re

from datasets import Dataset

# from trl import GRPOConfig, GRPOTrainer
from treepo.integrations.trl import TreePOConfig as GRPOConfig, TreePOTrainer as GRPOTrainer  # TreePO


def make_dataset(n: int, seed: int = 0) -> Dataset:
    """Arithmetic word problems as a conversational `prompt` column, with an `answer` column."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} plus {b}? Put the answer in \\boxed{{}}."}],
                     "answer": str(a + b)})
    return Dataset.from_list(rows)


def correctness(prompts, completions, answer, **kwargs) -> list[float]:
    """TRL's reward signature: 1 when the boxed answer is right, else 0."""
    out = []
    for completion, truth in zip(completions, answer):
        text = completion[0]["content"] if isinstance(completion, list) else completion
        found = re.findall(r"\\boxed\{([^}]*)\}", text)
        out.append(1.0 if found and found[-1].strip() == truth else 0.0)
    return out


def main(argv=None) -> GRPOTrainer:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="a model id or folder; 'smollm2' = treepo's local copy")
    p.add_argument("--tiny", action="store_true", help="a tiny random model and tokenizer (smoke test)")
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--output-dir", default="runs/trl_treepo")
    a = p.parse_args(argv)

    model, tokenizer = a.model, None
    if a.tiny:
        from treepo import tiny

        model, tokenizer = tiny.model("llama"), copy.deepcopy(tiny.tokenizer())  # the shared one stays template-free
        tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
                                   "{% if add_generation_prompt %}Answer: {% endif %}")
    elif a.model == "smollm2":
        from treepo.engines.loading import resolve_model_dir

        model = str(resolve_model_dir("smollm2"))

    args = GRPOConfig(
        output_dir=a.output_dir,
        per_device_train_batch_size=8 if not a.tiny else 4,
        num_generations=8 if not a.tiny else 4,
        max_completion_length=128 if not a.tiny else 16,
        max_steps=a.max_steps,
        learning_rate=1e-6 if not a.tiny else 1e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        bf16=False,
        treepo_depth=4, treepo_advantage="unbiased",  # TreePO
    )
    trainer = GRPOTrainer(model=model, reward_funcs=correctness, args=args, train_dataset=make_dataset(64),
                          processing_class=tokenizer)
    trainer.train()
    return trainer


if __name__ == "__main__":
    main()
