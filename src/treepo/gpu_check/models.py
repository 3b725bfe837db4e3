"""Randomly initialised models of real shapes for the speed parts, and a tokenizer that needs no files.

Nothing is downloaded: the configs are written out here (from the models' published config.json),
and the weights are drawn on the target device. With `toy=True` each config keeps its family and
its tying but shrinks to a few layers of width 64, so the CPU dry run goes through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class ModelSpec:
    """A named model shape: `config(toy)` returns its transformers config."""

    name: str
    params: str  # the real model's size, for the report
    config: Callable[[bool], object]


def smollm2_135m(toy: bool = False):
    """SmolLM2-135M's shape: Llama, hidden 576, 30 layers, 9 heads (3 KV heads), vocab 49152, tied embeddings."""
    from transformers import LlamaConfig

    shape = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192)
    if toy:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=1024, max_position_embeddings=1024)
    return LlamaConfig(**shape, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2)


def qwen25_15b(toy: bool = False):
    """Qwen2.5-1.5B's shape: Qwen2, hidden 1536, 28 layers, 12 heads (2 KV heads), vocab 151936, tied embeddings."""
    from transformers import Qwen2Config

    shape = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768)
    if toy:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=2048, max_position_embeddings=1024)
    return Qwen2Config(**shape, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
                       use_sliding_window=False, bos_token_id=151643 if not toy else 1,
                       eos_token_id=151643 if not toy else 2, pad_token_id=151643 if not toy else 2)


SPEED_MODELS = (ModelSpec("smollm2-135m", "135M", smollm2_135m), ModelSpec("qwen2.5-1.5b", "1.5B", qwen25_15b))


def random_model(config, device: torch.device, dtype: torch.dtype):
    """A causal LM of `config` with random weights drawn directly on `device` in `dtype`, eval mode, sdpa attention."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


class IdTokenizer:
    """Just enough tokenizer for the engine and the sampler on random token ids: EOS/pad ids and a
    `decode` that writes the ids out (random models' text means nothing; no tokenizer files needed)."""

    def __init__(self, vocab_size: int, eos_token_id: int, pad_token_id: int):
        self.vocab_size, self.eos_token_id, self.pad_token_id = vocab_size, eos_token_id, pad_token_id

    def __len__(self) -> int:
        return self.vocab_size

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return " ".join(str(int(i)) for i in ids)


def id_tokenizer(config) -> IdTokenizer:
    return IdTokenizer(config.vocab_size, config.eos_token_id, config.pad_token_id)


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """n prompts of `length` random token ids (ids 3.. so no prompt holds a special token)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()
