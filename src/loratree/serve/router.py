"""Routing a prompt to the fine-tune it most resembles, with the base model's own features.

Each adapter that carries a centroid (``routing.json``, written by the trainer) is a
candidate. A new prompt goes to the adapter whose centroid has the highest cosine
similarity with the prompt's own feature (``surgery.features``), both taken relative to
the mean of all centroids (features of one model share a large common direction that
says nothing about which fine-tune fits).

The candidates follow the source: before each route, an adapter added, replaced or
removed since the last one is read again (a store entry through its hash check, so a
``routing.json`` changed at rest is caught). An adapter whose centroid cannot be used
(damaged, malformed, of another model's width) is left out with one warning per version
naming it and the problem; the others keep routing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from loratree.adapters.routing_files import ROUTING_NAME, read_centroid
from loratree.adapters.source import AdapterSource
from loratree.adapters.store import AdapterStore
from loratree.errors import AdapterFileError, AdapterNotFoundError
from loratree.surgery.features import prompt_features
from loratree.tree.store_source import StoreSource

__all__ = ["Route", "Router"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    adapter: str
    score: float
    scores: dict[str, float]


@dataclass(frozen=True)
class _Candidate:
    version: str
    centroid: Tensor | None
    """None: no centroid (not a candidate), or one that cannot be used (``problem``)."""
    problem: str | None = None


class Router:
    """Routes prompts among the served adapters (of a store, or any ``AdapterSource``)
    that carry a usable centroid."""

    def __init__(self, store: AdapterStore | AdapterSource, model: nn.Module) -> None:
        self.source: AdapterSource = (StoreSource(store) if isinstance(store, AdapterStore)
                                      else store)
        self.model = model
        self.hidden: int | None = getattr(getattr(model, "config", None), "hidden_size", None)
        self._seen: dict[str, _Candidate] = {}
        self._stack()
        self.refresh()

    @property
    def skipped(self) -> dict[str, str]:
        """Adapters with a centroid that cannot be used, and why."""
        return {n: c.problem for n, c in self._seen.items() if c.problem is not None}

    def refresh(self) -> None:
        """Bring the candidates up to date with the source (reads only what changed)."""
        seen: dict[str, _Candidate] = {}
        for info in self.source.list():
            try:
                version = self.source.version_of(info.name)
            except (KeyError, ValueError, OSError):  # typed input errors are ValueErrors
                continue  # removed or broken since it was listed: not a candidate now
            old = self._seen.get(info.name)
            if old is not None and old.version == version:
                seen[info.name] = old
            elif (info.path / ROUTING_NAME).exists():
                seen[info.name] = self._read(info.name, version)
            else:
                seen[info.name] = _Candidate(version, None)
        if seen.keys() == self._seen.keys() and all(
                seen[n] is self._seen[n] for n in seen):
            return
        self._seen = seen
        self._stack()

    def _stack(self) -> None:
        usable = {n: c.centroid for n, c in sorted(self._seen.items())
                  if c.centroid is not None}
        self.names = list(usable)
        self.centroids = (torch.stack(list(usable.values())) if usable
                          else torch.zeros(0, self.hidden or 0))
        # Features of one model share a large common direction (anisotropy); comparing
        # after removing the centroids' mean leaves what tells the adapters apart.
        self.center = (self.centroids.mean(0) if len(usable) > 1
                       else torch.zeros(self.centroids.shape[1]))
        self.directions = torch.nn.functional.normalize(self.centroids - self.center, dim=-1)

    def _read(self, name: str, version: str) -> _Candidate:
        try:
            # read whole, as serving reads it: a store entry is checked against its hashes
            centroid = read_centroid(self.source.read(name).path)
            if centroid is not None and self.hidden is not None \
                    and centroid.numel() != self.hidden:
                raise AdapterFileError(f"routing centroid of size {centroid.numel()}, but "
                                       f"the model's features have {self.hidden}")
        except (KeyError, ValueError, OSError) as e:  # typed input errors are ValueErrors
            logger.warning("adapter %r left out of auto routing: %s", name, e)
            return _Candidate(version, None, str(e))
        return _Candidate(version, centroid)

    def route(self, prompt: Sequence[int]) -> Route:
        self.refresh()
        if not self.names:
            skipped = "; ".join(f"{n}: {p}" for n, p in self.skipped.items())
            raise AdapterNotFoundError(
                "no adapter in the store has a usable routing centroid; name an adapter "
                "instead of 'auto'" + (f" (left out: {skipped})" if skipped else ""))
        feature = prompt_features(self.model, [prompt])[0]
        scores = self.directions @ torch.nn.functional.normalize(feature - self.center, dim=0)
        best = int(scores.argmax())
        return Route(self.names[best], float(scores[best]),
                     dict(zip(self.names, scores.tolist(), strict=True)))
