"""The LoRA forward of a layer with many adapter slots: ``y + s[k] B[k] (A[k] x)``.

``add_lora`` runs one ``ops.plan`` plan over a layer's ``SlotFactors``: the per-slot
factors (what training differentiates), and, when a serving slot table owns the layer,
the same factors stacked with their scales folded in (``ops.stack``), which the batched
inference path reads without restacking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from loratree.ops import slots as slot_ops
from loratree.ops.plan import Grouped, GroupedRows, NoBranch, Plan, Runs, Segmented, Uniform
from loratree.ops.stack import stack_take

__all__ = ["SlotFactors", "Stacked", "add_lora"]


@dataclass(frozen=True)
class Stacked:
    """A serving table's stacks (``ops.stack``) and the largest rank they hold now."""

    a: Tensor
    b: Tensor
    rank: int


@dataclass(frozen=True)
class SlotFactors:
    """Every slot of one layer: A ``(r_s, in)``, B ``(out, r_s)``, the scale, the dropout
    probability and the LoRA bias ``(out,)`` (None: none) of each slot s."""

    a: Sequence[Tensor]
    b: Sequence[Tensor]
    scales: Sequence[float]
    dropout: Sequence[float]
    bias: Sequence[Tensor | None]
    stacked: Stacked | None = None

    def grouped(self, slots: Sequence[int], index: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        """``slots``' factors as ``(K, R, in)``, ``(K, out, R)``, B scaled (no autograd):
        taken from the stacks when there are some (``index``: the slots as a tensor),
        else stacked now."""
        if self.stacked is not None:
            st = self.stacked
            return stack_take(st.a, st.b, slots, st.rank, index)
        return slot_ops.stack_factors([a.detach() for a in self.a],
                                      [b.detach() for b in self.b], self.scales, slots)


def add_lora(y: Tensor, x: Tensor, factors: SlotFactors, plan: Plan) -> Tensor:
    """``y`` plus each token's LoRA branch, run as ``plan`` says.

    Semantics: y_t + s[k_t] B[k_t] A[k_t] x_t for each token t of a slot k_t >= 0 that the
    plan covers (``Uniform`` also adds its slot's s b); ``Grouped`` and ``Runs`` write
    into ``y`` itself (inference), the others return a new tensor (autograd).
    Shape: y (..., out), x (..., in) -> y's shape
    """
    match plan:
        case NoBranch():
            return y
        case Uniform(slot=k, dropout=dropout):
            return _uniform(y, x, factors, k, dropout)
    xs = x.reshape(-1, x.shape[-1])  # (N, in)
    ys = y.reshape(xs.shape[0], y.shape[-1])  # (N, out), a view of y when it can be
    match plan:
        case Grouped(layout=layout, index=index):
            a, b = factors.grouped(layout.slots, index)
            out = slot_ops.grouped_add(ys, xs, a, b, layout)
        case GroupedRows(layout=layout):
            out = _grouped_rows(ys, xs, factors, layout)
        case Runs(runs=runs):
            out = _runs(ys, xs, factors, runs)
        case Segmented(seg=seg, dropout=dropout):
            a0 = factors.a[seg.slots[0]]
            h = slot_ops.shrink(xs.to(a0.dtype), factors.a, seg, factors.dropout, dropout)
            out = slot_ops.expand(ys, h, factors.b, factors.scales, seg)
    return out.view(y.shape)


def _uniform(y: Tensor, x: Tensor, f: SlotFactors, k: int, dropout: bool) -> Tensor:
    """y + s ((x A^T) B^T + b), the expand, scale and add fused into one addmm."""
    a, b, s, p = f.a[k], f.b[k], f.scales[k], f.dropout[k]
    xs = x.to(a.dtype)
    if dropout and p > 0.0:
        xs = F.dropout(xs, p, training=True)
    h = xs.reshape(-1, a.shape[1]) @ a.t()  # (N, r)
    out = torch.addmm(y.reshape(-1, b.shape[0]), h.to(y.dtype), b.t().to(y.dtype),
                      alpha=s)  # (N, out)
    bias = f.bias[k]
    if bias is not None:
        out = out + bias.to(y.dtype) * s
    return out.view(y.shape)


def _grouped_rows(y: Tensor, x: Tensor, f: SlotFactors,
                  layout: slot_ops.GroupLayout) -> Tensor:
    """Training: every slot's branch for its own block of rows from ``layout.lo`` on,
    differentiable in the factors (no gather and no scatter through autograd)."""
    lo, a0 = layout.lo, f.a[layout.slots[0]]
    out = slot_ops.grouped_branch(x[lo:].to(a0.dtype), f.a, f.b, f.scales,
                                  layout.slots).to(y.dtype)
    return y + out if lo == 0 else torch.cat([y[:lo], y[lo:] + out])


def _runs(y: Tensor, x: Tensor, f: SlotFactors,
          runs: tuple[tuple[int, int, int], ...]) -> Tensor:
    """Inference: each run's branch added into its own rows of ``y``, in place."""
    for k, lo, hi in runs:
        a, b = f.a[k], f.b[k]
        h = x[lo:hi].to(a.dtype) @ a.t()  # (n, r)
        rows = y[lo:hi]
        torch.addmm(rows, h.to(y.dtype), b.t().to(y.dtype), alpha=f.scales[k], out=rows)
    return y
