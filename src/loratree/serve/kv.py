"""Key/value caches of many requests as one batch: rows join, rows leave, right-aligned.

Each row's cache is right-aligned in the batch: a row shorter than the batch is padded on
the left with zeros that its attention mask marks 0, so every row's next token is written
at the same column. A joining row (prefilled alone) is padded to the batch's length (or
the batch to the row's); a leaving row is dropped, and columns that only padding uses are
trimmed off the left.

Decoding appends one column per step. The batch keeps one cache object across steps whose
layers (``GrowingLayer``) hold their keys and values as views of buffers with spare
columns, so a step writes its new column in place: no per-step copy of the whole cache (a
``DynamicCache`` concatenates, copying every layer's keys and values at every token).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from loratree.surgery.prefix import mark_external

__all__ = ["BatchKV", "GrowingLayer"]

SPARE = 64
"""Columns of room a buffer gets past what it holds when it (re)allocates; it doubles."""


class GrowingLayer(DynamicLayer):
    """A cache layer whose ``keys`` / ``values`` are views of larger buffers, so appending
    a column writes in place and reallocates (copying) only when the buffer is full."""

    def __init__(self, keys: Tensor | None = None, values: Tensor | None = None) -> None:
        super().__init__()
        self._kbuf: Tensor | None = None
        self._vbuf: Tensor | None = None
        if keys is not None and values is not None:
            self.lazy_initialization(keys, values)
            self.keys, self.values = keys, values

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs
               ) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self.keys.shape[-2] if self.keys.numel() else 0
        need = held + key_states.shape[-2]
        if self._kbuf is None or need > self._kbuf.shape[-2]:
            self._kbuf = self._grow(self.keys, key_states, held, need)
            self._vbuf = self._grow(self.values, value_states, held, need)
        self._kbuf[..., held:need, :] = key_states
        self._vbuf[..., held:need, :] = value_states
        self.keys, self.values = self._kbuf[..., :need, :], self._vbuf[..., :need, :]
        return self.keys, self.values

    @staticmethod
    def _grow(old: Tensor, new: Tensor, held: int, need: int) -> Tensor:
        buf = new.new_empty(*new.shape[:-2], max(2 * need, need + SPARE), new.shape[-1])
        if held:
            buf[..., :held, :] = old
        return buf



@dataclass
class BatchKV:
    """Per-layer keys/values ``(B, H, L, D)`` and the mask ``(B, L)`` of the running rows."""

    keys: list[Tensor]
    values: list[Tensor]
    mask: Tensor
    _cache: DynamicCache | None = field(default=None, repr=False)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @classmethod
    def from_cache(cls, cache: DynamicCache, mask: Tensor) -> BatchKV:
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        return cls(keys, values, mask.long())

    def cache(self) -> DynamicCache:
        """The cache a decode step writes into: one object for this batch across steps,
        marked as managed by its owner. Its layers append in place."""
        if self._cache is None:
            cache = DynamicCache()
            cache.layers[:] = [GrowingLayer(k, v)
                               for k, v in zip(self.keys, self.values, strict=True)]
            self._cache = mark_external(cache)
        return self._cache

    def join(self, other: BatchKV) -> BatchKV:
        """This batch's rows, then ``other``'s, right-aligned to the longer of the two."""
        length = max(self.mask.shape[1], other.mask.shape[1])
        a, b = self._pad(length), other._pad(length)
        return BatchKV([torch.cat([x, y]) for x, y in zip(a.keys, b.keys, strict=True)],
                       [torch.cat([x, y]) for x, y in zip(a.values, b.values, strict=True)],
                       torch.cat([a.mask, b.mask]))

    def select(self, rows: list[int]) -> BatchKV:
        """Keep ``rows`` (in that order), trimming columns no kept row uses."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(0).nonzero()
        start = int(used[0]) if used.numel() else mask.shape[1]
        return BatchKV([k.index_select(0, index)[:, :, start:] for k in self.keys],
                       [v.index_select(0, index)[:, :, start:] for v in self.values],
                       mask[:, start:])

    def append(self, cache: DynamicCache) -> BatchKV:
        """After a decode step: the cache's grown tensors, the mask one column longer (the
        same cache object when the step wrote into ``cache()``)."""
        ones = torch.ones(self.rows, 1, dtype=self.mask.dtype, device=self.mask.device)
        grown = BatchKV.from_cache(cache, torch.cat([self.mask, ones], dim=1))
        if cache is self._cache:
            grown._cache = cache
        return grown

    def _pad(self, length: int) -> BatchKV:
        extra = length - self.mask.shape[1]
        if extra == 0:
            return self

        def pad(t: Tensor) -> Tensor:
            return torch.cat([t.new_zeros(*t.shape[:2], extra, t.shape[3]), t], dim=2)

        mask = torch.cat([self.mask.new_zeros(self.rows, extra), self.mask], dim=1)
        return BatchKV([pad(k) for k in self.keys], [pad(v) for v in self.values], mask)
