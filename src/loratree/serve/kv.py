"""Key/value caches of many requests as one batch: rows join, rows leave, right-aligned.

Each row's cache is right-aligned in the batch: a row shorter than the batch is padded on
the left with zeros that its attention mask marks 0, so every row's next token is written
at the same column. A joining row (prefilled alone) is padded to the batch's length (or
the batch to the row's); a leaving row is dropped, and columns that only padding uses are
trimmed off the left.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from loratree.surgery.prefix import mark_external

__all__ = ["BatchKV"]


@dataclass
class BatchKV:
    """Per-layer keys/values ``(B, H, L, D)`` and the mask ``(B, L)`` of the running rows."""

    keys: list[Tensor]
    values: list[Tensor]
    mask: Tensor

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @classmethod
    def from_cache(cls, cache: DynamicCache, mask: Tensor) -> BatchKV:
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        return cls(keys, values, mask.long())

    def cache(self) -> DynamicCache:
        """A fresh cache holding these tensors, marked as managed by its owner."""
        cache = DynamicCache()
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            cache.update(k, v, i)
        return mark_external(cache)

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
        """After a decode step: the cache's grown tensors, the mask one column longer."""
        ones = torch.ones(self.rows, 1, dtype=self.mask.dtype, device=self.mask.device)
        return BatchKV.from_cache(cache, torch.cat([self.mask, ones], dim=1))

    def _pad(self, length: int) -> BatchKV:
        extra = length - self.mask.shape[1]
        if extra == 0:
            return self

        def pad(t: Tensor) -> Tensor:
            return torch.cat([t.new_zeros(*t.shape[:2], extra, t.shape[3]), t], dim=2)

        mask = torch.cat([self.mask.new_zeros(self.rows, extra), self.mask], dim=1)
        return BatchKV([pad(k) for k in self.keys], [pad(v) for v in self.values], mask)
