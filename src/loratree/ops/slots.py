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

__all__ = [
    "Segments",
    "expand",
    "keep",
    "map_segments",
    "row_runs",
    "segment",
    "shrink",
    "stacked",
    "stacked_branch",
    "stacked_mask",
]


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


def row_runs(row_slots: Sequence[int], tokens_per_row: int,
             max_runs: int) -> tuple[tuple[int, int, int], ...] | None:
    """Consecutive rows that share a slot, as token ranges of the flattened batch.

    Semantics: (k, lo, hi) for each maximal run of rows with slot k >= 0; tokens lo..hi-1
    of the flat ``(rows * tokens_per_row)`` batch use slot k. None when there would be more
    than ``max_runs`` runs (then per-slot gathering does fewer matmuls).
    Shape: row_slots (B,) -> at most B runs.
    """
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(row_slots) + 1):
        if i == len(row_slots) or row_slots[i] != row_slots[start]:
            if row_slots[start] >= 0:
                runs.append((row_slots[start], start * tokens_per_row, i * tokens_per_row))
                if len(runs) > max_runs:
                    return None
            start = i
    return tuple(runs)


def keep(seg: Segments, slots: Sequence[int]) -> Segments:
    """Only the segments of ``slots`` (tokens of the others then get no adapter).

    Semantics: the same grouping with the other slots' tokens treated as k = -1.
    Shape: unchanged ``n_tokens``; ``order`` shrinks to the kept tokens.
    """
    wanted = set(slots)
    parts, kept, bounds = [], [], [0]
    for k, lo, hi in zip(seg.slots, seg.bounds[:-1], seg.bounds[1:], strict=True):
        if k in wanted:
            parts.append(seg.order[lo:hi])
            kept.append(k)
            bounds.append(bounds[-1] + hi - lo)
    order = torch.cat(parts) if parts else seg.order[:0]
    return Segments(order, tuple(kept), tuple(bounds), seg.n_tokens, None)


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


def stacked(a: Sequence[Tensor], b: Sequence[Tensor], scales: Sequence[float],
            slots: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """The given slots' adapters side by side: (A_cat, B_cat scaled, each column's slot).

    Semantics: A_cat = [A_k1; A_k2; ...], B_cat = [s_k1 B_k1, s_k2 B_k2, ...].
    Shape: a[k] (r_k, in), b[k] (out, r_k) -> (R, in), (out, R), (R,) with R = sum r_k
    """
    a_cat = torch.cat([a[k] for k in slots])
    b_cat = torch.cat([b[k] * scales[k] for k in slots], dim=1)
    cols = torch.cat([torch.full((a[k].shape[0],), k, dtype=torch.long, device=a_cat.device)
                      for k in slots])
    return a_cat, b_cat, cols


def stacked_mask(token_slots: Tensor, cols: Tensor, dtype: torch.dtype) -> Tensor:
    """Which stacked rank columns each token uses.

    Semantics: M[t, j] = 1 if cols[j] == token_slots[t] else 0.
    Shape: token_slots (N,), cols (R,) -> (N, R)
    """
    return (token_slots.unsqueeze(1) == cols.unsqueeze(0)).to(dtype)


def stacked_branch(x: Tensor, mask: Tensor, a_cat: Tensor, b_cat: Tensor,
                   y: Tensor | None = None) -> Tensor:
    """Every token's LoRA output from the side-by-side adapters, in two dense matmuls:
    each token keeps only the rank columns of its own slot (punica's BGMV, as a mask).
    With ``y`` the output is added into it, in place (inference only).

    Semantics: out_t = [y_t +] s_k B_k A_k x_t for k = the token's slot among the stacked
    ones, nothing for a token whose slot is not stacked (or -1).
    Shape: x (N, in), mask (N, R), a_cat (R, in), b_cat (out, R), y (N, out) -> (N, out)
    """
    h = (x @ a_cat.t()).mul_(mask)  # (N, R)
    if y is None:
        return h @ b_cat.t()
    if h.dtype != y.dtype:
        h, b_cat = h.to(y.dtype), b_cat.to(y.dtype)
    return torch.addmm(y, h, b_cat.t(), out=y)
