"""Saving a whole model directory atomically: readers see the old one or the new one."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from loratree.fsio import atomic_dir
from loratree.models.quantized import has_nf4, save_quantized

__all__ = ["save_model"]


def save_model(model: nn.Module, tokenizer: object | None, out: str | Path) -> Path:
    """Save a model directory (``save_pretrained``) atomically; NF4 layers in loratree's format.

    A model with ``NF4Linear`` layers is written by :func:`save_quantized` (plain
    transformers cannot hold its packed weights); any other by ``save_pretrained``.
    """
    if has_nf4(model):
        return save_quantized(model, tokenizer, out)

    out = Path(out).resolve()
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out
