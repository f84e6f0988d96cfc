"""Saving a whole model directory atomically: readers see the old one or the new one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from torch import nn

from loratree.fsio import fsync_dir, fsync_tree

__all__ = ["atomic_dir", "save_model"]


def save_model(model: nn.Module, tokenizer: object | None, out: str | Path) -> Path:
    """Save a model directory (``save_pretrained``) atomically; NF4 layers in loratree's format.

    A model with ``NF4Linear`` layers is written by :func:`save_quantized` (plain
    transformers cannot hold its packed weights); any other by ``save_pretrained``.
    """
    from loratree.models.quantized import has_nf4, save_quantized

    if has_nf4(model):
        return save_quantized(model, tokenizer, out)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return atomic_dir(out, write)


def atomic_dir(out: str | Path, write: Callable[[Path], None]) -> Path:
    """Fill a temp dir beside ``out`` via ``write(tmp)``, fsync, then rename into place.

    An existing ``out`` is replaced only after the new directory is complete.
    """
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        fsync_tree(tmp)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(out, old)
        os.rename(tmp, out)
        fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
