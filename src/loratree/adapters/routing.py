"""Routing a prompt to the fine-tune it most resembles, with the base model's own features.

An adapter's centroid is the mean, over its training prompts, of the base model's last
hidden state mean-pooled over each prompt's tokens (no adapter active), normalised to
unit length. It is stored beside the adapter as ``routing.json``. A new prompt goes to the
adapter whose centroid has the highest cosine similarity with the prompt's own feature,
both taken relative to the mean of all centroids (features of one model share a large
common direction that says nothing about which fine-tune fits).
No second model is needed: the base model is already in memory.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from loratree.adapters.store import AdapterStore
from loratree.errors import AdapterFileError, AdapterNotFoundError
from loratree.fsio import atomic_write
from loratree.surgery import prefix_bank
from loratree.surgery.inject import lora_layers

__all__ = ["ROUTING_NAME", "Router", "prompt_features", "read_centroid", "write_centroid"]

ROUTING_NAME = "routing.json"


@torch.inference_mode()
def prompt_features(model: nn.Module, prompts: Sequence[Sequence[int]],
                    batch_size: int = 16) -> Tensor:
    """Unit-length mean-pooled last hidden states of the base model, one per prompt.

    Semantics: f_i = normalize(mean_t h_L(prompt_i)[t]) with every adapter off.
    Shape: N prompts of token ids -> (N, hidden) fp32.
    """
    device = next(model.parameters()).device
    ctx = _context(model)
    body = _body(model)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start:start + batch_size]]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([p + [0] * (width - len(p)) for p in chunk], device=device)
        mask = (torch.arange(width, device=device)[None]
                < torch.tensor([len(p) for p in chunk], device=device)[:, None]).long()
        with ctx.use(-1) if ctx is not None else contextlib.nullcontext():
            if body is not None:  # the last hidden state without the LM head's product
                hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
            else:
                hidden = model(input_ids=ids, attention_mask=mask,
                               output_hidden_states=True).hidden_states[-1]
        pooled = (hidden.float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out).cpu()


def _body(model: nn.Module) -> nn.Module | None:
    """The decoder under a transformers LM head (``base_model``), whose output's
    ``last_hidden_state`` is the LM's last hidden state; None where there is no such
    part (the full model then runs, its logits discarded)."""
    body = getattr(model, "base_model", None)
    return body if isinstance(body, nn.Module) and body is not model else None


def _context(model: nn.Module):
    layers = lora_layers(model)
    if layers:
        return next(iter(layers.values())).ctx
    bank = prefix_bank(model)
    return bank.ctx if bank is not None else None


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


@dataclass(frozen=True)
class Route:
    adapter: str
    score: float
    scores: dict[str, float]


class Router:
    """Routes prompts among the store's adapters that carry a centroid."""

    def __init__(self, store: AdapterStore, model: nn.Module) -> None:
        self.store, self.model = store, model
        self.names: list[str] = []
        centroids = []
        hidden = None
        for info in store.list():
            c = read_centroid(info.path)
            if c is None:
                continue
            hidden = hidden or c.numel()
            if c.numel() != hidden:
                raise AdapterFileError(f"{info.name}: routing centroid of size {c.numel()}, "
                                       f"others have {hidden}")
            self.names.append(info.name)
            centroids.append(c)
        self.centroids = torch.stack(centroids) if centroids else torch.zeros(0, 0)
        # Features of one model share a large common direction (anisotropy); comparing
        # after removing the centroids' mean leaves what tells the adapters apart.
        self.center = self.centroids.mean(0) if len(centroids) > 1 else torch.zeros(
            hidden or 0)
        self.directions = torch.nn.functional.normalize(self.centroids - self.center, dim=-1)

    def route(self, prompt: Sequence[int]) -> Route:
        if not self.names:
            raise AdapterNotFoundError("no adapter in the store has a routing centroid; "
                                       "name an adapter instead of 'auto'")
        feature = prompt_features(self.model, [prompt])[0]
        scores = self.directions @ torch.nn.functional.normalize(feature - self.center, dim=0)
        best = int(scores.argmax())
        return Route(self.names[best], float(scores[best]),
                     dict(zip(self.names, scores.tolist(), strict=True)))
