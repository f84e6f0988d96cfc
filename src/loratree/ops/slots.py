"""Many adapters in one batch: per-token slot indices, grouped into segments.

A layer holds S adapter slots. Each token t carries a slot index k_t (-1: no adapter).
Tokens are sorted by slot once per forward (``segment``); each layer then runs one dense
matmul per *distinct* slot over that slot's tokens (a segmented gather-matmul-scatter, as
in punica's SGMV), never one Python iteration per row. When every token uses one slot,
``Segments.uniform`` is set and callers use the plain formula with no gather at all.

A decode step has few tokens and many slots, so a matmul per slot is mostly call overhead.
There every slot's tokens are laid out ``(k slots, m tokens)`` (``grouped_layout``) and all
slots go through one batched matmul pair (``grouped_add``, punica's BGMV as ``bmm``). When
the batch is sorted by slot with as many tokens per slot, the layout is a view: no gather.

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
    "GroupLayout",
    "Segments",
    "expand",
    "grouped_add",
    "grouped_branch",
    "grouped_layout",
    "keep",
    "map_segments",
    "row_layout",
    "row_runs",
    "segment",
    "shrink",
    "stack_factors",
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


@dataclass(frozen=True)
class GroupLayout:
    """Tokens laid out as ``(k, m)``: m token places for each of k slots, in slot order.

    Contiguous (``gather`` None): tokens ``lo .. lo + k*m - 1`` already lie that way (a
    batch sorted by slot, every slot with m tokens), so the layout is a view. Else
    ``gather`` names the token at each of the k*m places (``n_tokens``: an empty place, a
    zero row) and ``dest`` / ``places`` the filled places' tokens and places.
    """

    slots: tuple[int, ...]
    m: int
    lo: int
    n_tokens: int
    gather: Tensor | None = None
    dest: Tensor | None = None
    places: Tensor | None = None


def grouped_layout(token_slots: Sequence[int], slots: Sequence[int],
                   device: torch.device | None = None) -> GroupLayout:
    """Where each token of ``slots`` goes in a ``(k, m)`` layout (tokens of other slots,
    and -1, go nowhere).

    Semantics: place (j, i) holds the i-th token (in order) whose slot is slots[j].
    Shape: token_slots (N,) -> k = len(slots) groups of m = the most tokens any slot has.
    """
    where: dict[int, list[int]] = {s: [] for s in slots}
    for t, s in enumerate(token_slots):
        if s in where:
            where[s].append(t)
    n, k = len(token_slots), len(slots)
    m = max((len(v) for v in where.values()), default=0)
    lo = n - k * m
    flat = [t for s in slots for t in where[s]]
    if lo >= 0 and flat == list(range(lo, n)):
        return GroupLayout(tuple(slots), m, lo, n)
    gather = [n] * (k * m)
    for j, s in enumerate(slots):
        gather[j * m : j * m + len(where[s])] = where[s]
    places = [p for p, t in enumerate(gather) if t < n]
    return GroupLayout(tuple(slots), m, -1, n,
                       torch.tensor(gather, dtype=torch.long, device=device),
                       torch.tensor([gather[p] for p in places], dtype=torch.long,
                                    device=device),
                       torch.tensor(places, dtype=torch.long, device=device))


def row_layout(row_slots: Sequence[int], slots: Sequence[int],
               n_tokens: int) -> GroupLayout | None:
    """The ``(k, m)`` layout of ``slots``' tokens when it is a view of whole rows, else None.

    Semantics: ``grouped_layout`` of the rows, each row's tokens kept together: rows
    sorted by slot among ``slots``, as many rows per slot, after any other rows.
    Shape: row_slots (B,) with n_tokens = B * T -> m = rows per slot * T tokens.
    """
    if not row_slots or n_tokens % len(row_slots):
        return None
    rows = grouped_layout(row_slots, slots)
    if rows.gather is not None:
        return None
    per_row = n_tokens // len(row_slots)
    return GroupLayout(rows.slots, rows.m * per_row, rows.lo * per_row, n_tokens)


def stack_factors(a: Sequence[Tensor], b: Sequence[Tensor], scales: Sequence[float],
                  slots: Sequence[int]) -> tuple[Tensor, Tensor]:
    """The given slots' factors stacked for ``torch.bmm`` (vLLM's layout): B scaled, a
    smaller rank padded with zeros to the largest. Differentiable in ``a`` and ``b`` (the
    fused trainer stacks live parameters; inference passes detached ones).

    Semantics: A[j] = [A_k; 0], B[j] = [s_k B_k | 0] for k = slots[j], so
    B[j] A[j] x = s_k B_k A_k x.
    Shape: a[k] (r_k, in), b[k] (out, r_k) -> (K, R, in), (K, out, R) with R = max r_k
    """
    r = max(a[k].shape[0] for k in slots)
    return (torch.stack([F.pad(a[k], (0, 0, 0, r - a[k].shape[0])) for k in slots]),
            torch.stack([F.pad(b[k] * scales[k], (0, r - b[k].shape[1])) for k in slots]))


def grouped_add(y: Tensor, x: Tensor, a: Tensor, b: Tensor, layout: GroupLayout) -> Tensor:
    """Every token's LoRA output added into ``y`` in place, one batched matmul pair for all
    slots (punica's BGMV as ``bmm``): each slot's factors are read once, for its own tokens
    only, so one slot's tokens never touch another's factors.

    Semantics: y_t += B_j A_j x_t for j = the place of the token's slot in ``layout.slots``
    (B_j holding the slot's scale: ``stack_factors``).
    Shape: y (N, out), x (N, in), a (K, R, in), b (K, out, R) -> y
    """
    at, bt = a.transpose(1, 2), b.transpose(1, 2)  # (K, in, R), (K, R, out): views
    k, m = at.shape[0], layout.m
    if layout.gather is None:
        xs, ys = (x, y) if layout.lo == 0 else (x[layout.lo :], y[layout.lo :])
        xs, ys = xs.view(k, m, x.shape[1]), ys.view(k, m, y.shape[1])
        h = torch.bmm(xs if xs.dtype == at.dtype else xs.to(at.dtype), at)
        if ys.dtype == bt.dtype:
            torch.baddbmm(ys, h, bt, out=ys)
        else:
            ys += torch.bmm(h, bt).to(ys.dtype)
        return y
    padded = torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(0, layout.gather)
    h = torch.bmm(padded.view(k, m, x.shape[1]).to(at.dtype), at)
    out = torch.bmm(h, bt).view(k * m, -1)
    if layout.places.numel() != k * m:
        out = out.index_select(0, layout.places)
    return y.index_add_(0, layout.dest, out.to(y.dtype))


def grouped_branch(x: Tensor, a: Sequence[Tensor], b: Sequence[Tensor],
                   scales: Sequence[float], slots: Sequence[int]) -> Tensor:
    """Every slot's LoRA output for its own block of rows, one batched matmul pair for all
    slots, differentiable in ``a`` and ``b`` (training: the fused trainer's rows sorted by
    job, as many per job, so the blocks are a view of the batch and nothing is gathered).

    Semantics: out[j*m + i] = s_k B_k A_k x[j*m + i] for k = slots[j], m = N / len(slots);
    a slot of rank 0 gives zeros. A smaller rank is padded with zeros to the largest, which
    adds nothing to the output nor to the gradients of the real factors.
    Shape: x (N, in), a[k] (r_k, in), b[k] (out, r_k) -> (N, out)
    """
    k = len(slots)
    assert k and x.shape[0] % k == 0, f"{x.shape[0]} rows do not split into {k} slots"
    sa, sb = stack_factors(a, b, scales, slots)  # (K, R, in), (K, out, R)
    h = torch.bmm(x.reshape(k, -1, x.shape[1]), sa.transpose(1, 2))  # (K, m, R)
    return torch.bmm(h, sb.transpose(1, 2)).reshape(x.shape[0], sb.shape[1])  # (N, out)
