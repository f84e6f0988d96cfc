"""Saving a whole model directory atomically: readers see the old one or the new one."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from loratree.fsio import fsync_dir, fsync_tree

__all__ = ["save_model"]


def save_model(model: nn.Module, tokenizer: object | None, out: str | Path) -> Path:
    """``save_pretrained`` into a temp dir beside ``out``, fsync, then rename into place.

    An existing ``out`` is replaced only after the new directory is complete.
    """
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
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

