"""How a LoRA layer adds a batch's adapters: one typed plan per batch layout.

A forward adds ``s[k] B[k] (A[k] x)`` for each token's slot k. Which kernels do that best
depends only on the batch (which slot each row or token uses), on which slots touch the
layer, and on whether autograd records; ``choose_plan`` picks from plain values, so every
layer alike shares one plan per forward and a test can ask which plan a layout gets:

- ``NoBranch``: no token's slot touches the layer;
- ``Uniform``: every token uses one slot (the plain formula, nothing gathered);
- ``Grouped``: inference, every slot's tokens in one batched matmul pair (punica's BGMV
  as ``bmm``): a view when rows are sorted by slot with as many per slot, else gathered
  when the batch is a decode step (at most ``GATHER_MAX_TOKENS`` tokens);
- ``GroupedRows``: training on rows sorted by slot, as many per slot: one differentiable
  batched matmul pair over a view of the rows;
- ``Runs``: inference on runs of rows that share a slot (prefill): each run in place;
- ``Segmented``: anything else (training with dropout, per-token mixes): one matmul pair
  per slot over its gathered tokens (punica's SGMV).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from loratree.ops.slots import (
    GroupLayout,
    Segments,
    grouped_layout,
    keep,
    row_layout,
    row_runs,
    segment,
)

__all__ = ["GATHER_MAX_TOKENS", "NO_BRANCH", "Batch", "Grouped", "GroupedRows", "NoBranch",
           "Plan", "Runs", "Segmented", "Uniform", "choose_plan", "describe"]

GATHER_MAX_TOKENS = 64
"""At inference, a mixed batch of at most this many tokens (a decode step) gathers its
tokens into one batched matmul pair (``Grouped``); a longer one (a prefill) would copy
more than it saves, so it runs runs of rows in place or one matmul pair per slot."""


@dataclass(frozen=True)
class NoBranch:
    """No token's slot touches the layer: ``y`` is the base output."""


NO_BRANCH = NoBranch()


@dataclass(frozen=True)
class Uniform:
    """Every token uses ``slot``; ``dropout``: apply the slot's dropout (training)."""

    slot: int
    dropout: bool = False


@dataclass(frozen=True)
class Grouped:
    """Inference: every slot of ``layout`` over its tokens in one batched matmul pair,
    added into ``y`` in place (a view of the tokens when ``layout.gather`` is None);
    ``index``: ``layout.slots`` as a tensor, to take their rows of stacked factors."""

    layout: GroupLayout
    index: Tensor


@dataclass(frozen=True)
class GroupedRows:
    """Training: rows sorted by slot, as many per slot from token ``layout.lo`` on (a
    view), every slot in one differentiable batched matmul pair (a new tensor)."""

    layout: GroupLayout


@dataclass(frozen=True)
class Runs:
    """Inference: each ``(slot, lo, hi)`` run of tokens added in place by its slot."""

    runs: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class Segmented:
    """One matmul pair per slot of ``seg`` over its gathered tokens, scattered back;
    ``dropout``: apply each slot's dropout (training)."""

    seg: Segments
    dropout: bool = False


Plan = NoBranch | Uniform | Grouped | GroupedRows | Runs | Segmented


@dataclass(frozen=True)
class Batch:
    """What ``choose_plan`` needs of one forward's slot index, for an input of
    ``segments.n_tokens`` tokens."""

    slots: tuple[int, ...]
    """The distinct slots of the batch, sorted (-1: rows of the base model)."""
    segments: Segments
    token_slots: Tensor
    """The slot of each token ``(N,)``."""
    row_slots: tuple[int, ...] | None
    """The slot of each row when the index is per row (each row the same token count)."""


def describe(token_slots: Tensor, row_slots: Sequence[int] | None = None) -> Batch:
    """The ``Batch`` of a flat per-token slot index (and the per-row one it came from).

    Semantics: slots = sorted distinct values; segments = ``segment(token_slots)``.
    Shape: token_slots (N,), row_slots (B,) with N a multiple of B.
    """
    seg = segment(token_slots)
    if seg.uniform is not None:
        slots: tuple[int, ...] = (seg.uniform,)
    else:
        slots = tuple(sorted(set(token_slots.unique().tolist())))
    rows = tuple(row_slots) if row_slots is not None else None
    return Batch(slots, seg, token_slots, rows)


def choose_plan(batch: Batch, live: frozenset[int], *, grad: bool, dropout: bool,
                grouped: bool, gather_max: int = GATHER_MAX_TOKENS) -> Plan:
    """How a layer whose slots of rank > 0 are ``live`` adds the batch's branches.

    ``grad``: autograd records (training); ``dropout``: in training mode with dropout on
    a slot of the batch; ``grouped``: the layer has the batched matmul paths (LoRA on a
    matrix multiply). Pure: the same values give the same plan.
    """
    if live.isdisjoint(batch.slots):
        return NO_BRANCH
    seg = batch.segments
    if seg.uniform is not None:
        return Uniform(seg.uniform, dropout) if seg.uniform >= 0 else NO_BRANCH
    if grouped and grad and not dropout and batch.row_slots is not None:
        layout = row_layout(batch.row_slots, seg.slots, seg.n_tokens)
        if layout is not None:
            return GroupedRows(layout)
    kept = tuple(k for k in seg.slots if k in live)
    if grouped and not grad:
        plan = _inference(batch, live, kept, gather_max)
        if plan is not None:
            return plan
    return Segmented(seg if len(kept) == len(seg.slots) else keep(seg, kept), dropout)


def _inference(batch: Batch, live: frozenset[int], kept: tuple[int, ...],
               gather_max: int) -> Plan | None:
    """Inference without a per-slot gather, when the layout allows one: ``Grouped`` on
    a view of rows or a decode step's gathered tokens, ``Runs`` on runs of rows."""
    rows, n = batch.row_slots, batch.segments.n_tokens
    device = batch.segments.order.device
    index = torch.tensor(kept, dtype=torch.long, device=device)
    if rows is not None:
        layout = row_layout(rows, kept, n)
        if layout is not None:
            return Grouped(layout, index)
    if n <= gather_max:
        return Grouped(grouped_layout(batch.token_slots.tolist(), kept, device), index)
    if rows is not None:
        runs = row_runs(rows, n // len(rows), 2 * len(set(rows)))
        if runs is not None:
            return Runs(tuple(r for r in runs if r[0] in live))
    return None
