"""``routing.json``: an adapter's routing centroid, stored beside its PEFT files.

The centroid is the unit mean of the base model's features (``surgery.features``) over
the adapter's training prompts; ``serve.router`` sends ``adapter="auto"`` requests to
the adapter whose centroid the prompt's own feature is closest to.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor

from loratree.errors import AdapterFileError
from loratree.fsio import atomic_write

__all__ = ["ROUTING_NAME", "read_centroid", "write_centroid"]

ROUTING_NAME = "routing.json"


def write_centroid(adapter_dir: str | Path, features: Tensor) -> Path:
    """Store the unit mean of ``features`` (N, hidden) as the adapter's ``routing.json``."""
    centroid = torch.nn.functional.normalize(features.float().mean(0), dim=0)
    payload = {"version": 1, "pooling": "mean-last-hidden", "n_prompts": int(features.shape[0]),
               "centroid": [round(float(x), 7) for x in centroid]}
    path = Path(adapter_dir) / ROUTING_NAME
    text = json.dumps(payload) + "\n"
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
    return path


def read_centroid(adapter_dir: str | Path) -> Tensor | None:
    """The adapter's centroid, or None when it has no ``routing.json``."""
    path = Path(adapter_dir) / ROUTING_NAME
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        values = raw["centroid"]
        if not isinstance(values, list) or not values or not all(
                isinstance(v, int | float) and math.isfinite(v) for v in values):
            raise ValueError("centroid must be a non-empty list of finite numbers")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise AdapterFileError(f"{path}: not a valid routing file: {e}") from e
    return torch.tensor(values, dtype=torch.float32)
