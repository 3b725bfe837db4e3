"""Tiny random models and a tiny tokenizer, built in milliseconds, nothing from a hub.

The tests (through tests/tiny.py) and the GPU check (`treepo.gpu_check`) build their models here,
so a check on a bare machine runs on exactly the models the CPU tests run on.
"""

from __future__ import annotations

import functools
import json

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

CORPUS = [
    "What is 12 plus 7? Let us think step by step. 12 + 7 = 19. The answer is \\boxed{19}.",
    "Count the letters in the word banana. b a n a n a: six letters, so \\boxed{6}.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps on the mat.",
] * 20


@functools.lru_cache(maxsize=1)
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def _common(vocab: int) -> dict:
    return dict(vocab_size=vocab, eos_token_id=1, pad_token_id=0, bos_token_id=None)


def model(kind: str = "llama", seed: int = 0, **overrides):
    """A random tiny causal LM of the given family, float32, eval mode."""
    torch.manual_seed(seed)
    vocab = len(tokenizer())
    if kind == "llama":
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=512, **_common(vocab), **overrides)
        m = LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=512, **_common(vocab), **overrides)
        m = Qwen2ForCausalLM(cfg)
    elif kind == "qwen3":
        cfg = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, max_position_embeddings=512, **_common(vocab), **overrides)
        m = Qwen3ForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **_common(vocab), **overrides)
        m = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(kind)
    # Random init gives near-uniform logits; sharpen them so greedy choices are far from ties.
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return m.eval()


def prompts(texts=("What is 12 plus 7?", "Count the letters in banana, please", "fox")) -> list[list[int]]:
    tok = tokenizer()
    return [tok(t)["input_ids"] for t in texts]


def write_prompts(path, n: int):
    """A JSONL file of n arithmetic prompts with answers ("What is i plus i?" -> 2i); returns the path."""
    path.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(n)))
    return path


def tree_samples(tree, seed: int):
    """A tree's trajectories as training samples with random advantages and the engine's log-probs as the
    old ones (for packed-vs-flat checks and benchmarks)."""
    from .train.logprobs import Sample

    g = torch.Generator().manual_seed(seed)
    out = []
    for leaf in tree.leaves:
        traj = tree.trajectory(leaf)
        if traj.token_ids:
            adv = torch.randn(len(traj.token_ids), generator=g).tolist()
            out.append(Sample(tree.prompt_ids, traj.token_ids, adv, traj.logprobs, group=0))
    return out


def letter_share(prompts, completions, **columns):
    """A reward with TRL's signature for tiny models: +1 when a completion has more letters 'a'-'m' than
    'n'-'z', else -1, so it varies within a group on random text and an update has a signal."""
    out = []
    for c in completions:
        low = sum("a" <= ch <= "m" for ch in c.lower())
        high = sum("n" <= ch <= "z" for ch in c.lower())
        out.append(1.0 if low > high else -1.0)
    return out


PAPER_SHAPE = dict(prompt=256, leaves=16, depth=14, fork_levels=4)  # TreePO's training trees (w=16, 14 segments)


def paper_shape_tokens(seg: int, prompt: int = 256, leaves: int = 16, depth: int = 14, fork_levels: int = 4) -> int:
    """Unique tokens of `paper_shape_samples(seg, ...)`'s tree."""
    return prompt + seg * sum(min(2 ** min(level + 1, fork_levels), leaves) for level in range(depth))


def paper_shape_samples(seg: int, vocab: int, prompt: int = 256, leaves: int = 16, depth: int = 14,
                        fork_levels: int = 4, seed: int = 0):
    """A synthetic tree of TreePO's shape as training samples: a `prompt`-token prompt, `depth` segments
    of `seg` random tokens per path, every path forking in two at each of the first `fork_levels`
    segments (so 2^fork_levels = `leaves` paths), random advantages and old log-probs."""
    from .train.logprobs import Sample

    assert 2 ** fork_levels == leaves, "leaves must be 2 ** fork_levels"
    g = torch.Generator().manual_seed(seed * 100003 + seg)
    draw = lambda n: torch.randint(2, vocab, (n,), generator=g).tolist()  # noqa: E731
    head = draw(prompt)
    responses: list[list[int]] = [[]]
    for level in range(depth):
        copies = 2 if level < fork_levels else 1
        responses = [r + draw(seg) for r in responses for _ in range(copies)]
    return [Sample(head, r, torch.randn(len(r), generator=g).tolist(), (-torch.rand(len(r), generator=g)).tolist(),
                   group=0) for r in responses]
