"""The tests' tiny models and tokenizer: `treepo.tiny` (shared with the GPU check), plus a saved-model helper."""

from __future__ import annotations

from treepo.tiny import CORPUS, model, prompts, tokenizer, write_prompts

__all__ = ["CORPUS", "model", "prompts", "save_model_dir", "tokenizer", "write_prompts"]


def save_model_dir(path):
    """A tiny random Llama and its tokenizer saved where `--model DIR` can load them; returns the path."""
    model().save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path
