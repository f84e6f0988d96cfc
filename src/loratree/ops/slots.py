"""Many adapters in one batch: per-token slot indices, grouped into segments.

A layer holds S adapter slots. Each token t carries a slot index k_t (-1: no adapter).
Tokens are sorted by slot once per forward (``segment``); each layer then runs one dense
matmul per *distinct* slot over that slot's tokens (a segmented gather-matmul-scatter, as
in punica's SGMV), never one Python iteration per row. When every token uses one slot,
``Segments.uniform`` is set and callers use the plain formula with no gather at all.

Slot tensors may be stacked ``(S, R, in)`` or given as a sequence of S tensors whose ranks
differ (``(r_s, in)``); both index as ``a[s]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Segments", "expand", "map_segments", "segment", "shrink"]


@dataclass(frozen=True)
class Segments:
    """Tokens grouped by slot.

    ``order`` lists the positions of tokens with a slot (k >= 0), sorted by slot;
    segment i covers ``order[bounds[i]:bounds[i+1]]`` and uses slot ``slots[i]``.
    ``uniform`` is the one slot every token uses (possibly -1), else None.
    """

    order: Tensor
    slots: tuple[int, ...]
    bounds: tuple[int, ...]
    n_tokens: int
    uniform: int | None


def segment(index: Tensor) -> Segments:
    """Group token positions by slot.

    Semantics: for each distinct k >= 0 in ``index``, the positions t with index[t] == k.
    Shape: index (N,) integer, -1 for none.
    """
    assert index.dim() == 1, f"slot index must be flat, got shape {tuple(index.shape)}"
    n = index.numel()
    lo_hi = torch.aminmax(index) if n else None
    if n == 0 or int(lo_hi.min) == int(lo_hi.max):
        k = int(lo_hi.min) if n else -1
        if k < 0:
            return Segments(index.new_zeros(0), (), (0,), n, -1)
        return Segments(torch.arange(n, device=index.device), (k,), (0, n), n, k)
    sorted_k, order = torch.sort(index, stable=True)
    values, counts = torch.unique_consecutive(sorted_k, return_counts=True)
    slots, bounds, start = [], [0], 0
    for k, c in zip(values.tolist(), counts.tolist(), strict=True):
        if k < 0:
            start += c
            continue
        slots.append(k)
        bounds.append(bounds[-1] + c)
    return Segments(order[start:], tuple(slots), tuple(bounds), n, None)


def map_segments(x: Tensor, seg: Segments, fn: Callable[[int, Tensor], Tensor]) -> Tensor:
    """Apply a per-slot function to each segment and scatter the results back.

    Semantics: out[t] = fn(k_t, x[t]) for tokens with k_t >= 0, and 0 for k_t = -1.
    Shape: x (N, ...) -> (N, ...fn's output row); ``seg`` must hold at least one segment.
    """
    assert seg.slots, "map_segments needs at least one segment with a slot"
    parts = [
        fn(k, x.index_select(0, seg.order[lo:hi]))
        for k, lo, hi in zip(seg.slots, seg.bounds[:-1], seg.bounds[1:], strict=True)
    ]
    out = parts[0].new_zeros((seg.n_tokens, *parts[0].shape[1:]))
    return out.index_add(0, seg.order, torch.cat(parts))


def shrink(
    x: Tensor,
    a: Sequence[Tensor] | Tensor,
    seg: Segments,
    dropout: Sequence[float] = (),
    training: bool = False,
) -> list[Tensor]:
    """Project each segment's tokens down to its slot's rank.

    Semantics: h_t = A[k_t] @ dropout_k(x_t), returned per segment in ``seg.order``.
    Shape: x (N, in), a[s] (r_s, in) -> list of (n_i, r_{k_i})
    """
    out = []
    for k, lo, hi in zip(seg.slots, seg.bounds[:-1], seg.bounds[1:], strict=True):
        xs = x.index_select(0, seg.order[lo:hi])
        p = dropout[k] if dropout else 0.0
        if p > 0.0 and training:
            xs = F.dropout(xs, p, training=True)
        out.append(xs @ a[k].t())
    return out


def expand(
    y: Tensor,
    h: Sequence[Tensor],
    b: Sequence[Tensor] | Tensor,
    scales: Sequence[float],
    seg: Segments,
) -> Tensor:
    """Project each segment back up and add it to the base output (a new tensor).

    Semantics: y_t + s[k_t] * B[k_t] @ h_t for tokens with k_t >= 0; y_t otherwise.
    Shape: y (N, out), h list of (n_i, r_{k_i}), b[s] (out, r_s) -> (N, out)
    """
    if not seg.slots:
        return y
    parts = [hi @ b[k].t() * scales[k] for k, hi in zip(seg.slots, h, strict=True)]
    return y.index_add(0, seg.order, torch.cat(parts).to(y.dtype))
