"""Tokenizer helpers: every checkpoint and artifact carries a ``tokenizer.json`` (Hugging Face tokenizers)."""
from __future__ import annotations

from pathlib import Path

from edgeprune.errors import ModelError


def load_tokenizer(model_dir: str | Path):
    """The fast tokenizer saved with a checkpoint."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise ModelError(f"{model_dir}: no tokenizer.json; save the tokenizer with the checkpoint")
    try:
        return AutoTokenizer.from_pretrained(model_dir, use_fast=True)
    except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
        raise ModelError(f"{model_dir / 'tokenizer.json'}: not a readable tokenizer "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}); "
                         "save the tokenizer with save_pretrained") from None


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
    """Save the tokenizer of ``src`` (tokenizer.json and its config) into ``dst``."""
    load_tokenizer(src).save_pretrained(dst)
