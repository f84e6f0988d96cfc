"""Routing a prompt to the fine-tune it most resembles, with the base model's own features.

Each adapter that carries a centroid (``routing.json``, written by the trainer) is a
candidate. A new prompt goes to the adapter whose centroid has the highest cosine
similarity with the prompt's own feature (``surgery.features``), both taken relative to
the mean of all centroids (features of one model share a large common direction that
says nothing about which fine-tune fits).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from loratree.adapters.routing_files import read_centroid
from loratree.adapters.source import AdapterSource
from loratree.adapters.store import AdapterStore
from loratree.errors import AdapterFileError, AdapterNotFoundError
from loratree.surgery.features import prompt_features

__all__ = ["Route", "Router"]


@dataclass(frozen=True)
class Route:
    adapter: str
    score: float
    scores: dict[str, float]


class Router:
    """Routes prompts among the served adapters (of a store, or any ``AdapterSource``)
    that carry a centroid."""

    def __init__(self, store: AdapterStore | AdapterSource, model: nn.Module) -> None:
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
