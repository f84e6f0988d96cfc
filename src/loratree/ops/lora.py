"""The LoRA update on one weight matrix.

Conventions: a weight is ``(out, in)`` like ``nn.Linear``; ``a`` is ``(r, in)``,
``b`` is ``(out, r)``; ``scale`` is ``alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["apply", "branch", "delta", "grow", "grown_alpha", "merge", "scale", "switch",
           "unmerge"]


def scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """Semantics: alpha / r, or alpha / sqrt(r) when ``rslora``."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def delta(a: Tensor, b: Tensor, s: float) -> Tensor:
    """The weight update of one adapter.

    Semantics: delta_w = s * B @ A
    Shape: a (r, in), b (out, r) -> (out, in)
    """
    assert a.dim() == 2 and b.dim() == 2 and a.shape[0] == b.shape[1], (
        f"a {tuple(a.shape)} and b {tuple(b.shape)} do not share a rank"
    )
    return (b * s) @ a  # scale the small factor, not the (out, in) product


def branch(x: Tensor, a: Tensor, b: Tensor, s: float) -> Tensor:
    """The LoRA branch alone, computed as B(Ax) and never as (BA)x.

    Semantics: s * (x @ A^T) @ B^T
    Shape: x (..., in), a (r, in), b (out, r) -> (..., out)
    """
    return (x @ a.t()) @ b.t() * s


def apply(
    x: Tensor, w: Tensor, a: Tensor, b: Tensor, s: float, bias: Tensor | None = None
) -> Tensor:
    """A LoRA-adapted linear map.

    Semantics: y = x @ W^T + bias + s * (x @ A^T) @ B^T
    Shape: x (..., in), w (out, in), a (r, in), b (out, r), bias (out,) -> (..., out)
    """
    y = torch.nn.functional.linear(x, w, bias)
    return y + branch(x, a, b, s)


def merge(w: Tensor, a: Tensor, b: Tensor, s: float) -> Tensor:
    """Fold the adapter into the weight (a new tensor; ``w`` is not changed).

    Semantics: W' = W + s * B @ A, computed in fp32 at least, returned in W's dtype.
    Shape: w (out, in), a (r, in), b (out, r) -> (out, in)
    """
    acc = _acc_dtype(w)
    return (w.to(acc) + delta(a.to(acc), b.to(acc), s)).to(w.dtype)


def unmerge(w: Tensor, a: Tensor, b: Tensor, s: float) -> Tensor:
    """Take a merged adapter back out of the weight.

    Semantics: W = W' - s * B @ A
    Shape: w (out, in), a (r, in), b (out, r) -> (out, in)
    """
    acc = _acc_dtype(w)
    return (w.to(acc) - delta(a.to(acc), b.to(acc), s)).to(w.dtype)


def switch(
    w: Tensor,
    old: tuple[Tensor, Tensor, float],
    new: tuple[Tensor, Tensor, float],
) -> Tensor:
    """Swap one merged adapter for another with one addition to the weight.

    The difference of the two updates is formed in float64 and added once, so each switch
    rounds the weight once (a random walk of about eps * |W| per switch, not a drift).

    Semantics: W' = W + (s_new * B_new @ A_new - s_old * B_old @ A_old)
    Shape: w (out, in); old and new are (a (r, in), b (out, r), s) -> (out, in)
    """
    (a0, b0, s0), (a1, b1, s1) = old, new
    diff = delta(a1.double(), b1.double(), s1) - delta(a0.double(), b0.double(), s0)
    return (w.double() + diff).to(w.dtype)


def grow(a: Tensor, b: Tensor, new_a: Tensor) -> tuple[Tensor, Tensor]:
    """Raise the rank of one adapter without changing its update.

    The new rows of A are ``new_a`` (any values: they meet zero columns of B), so
    B' @ A' = B @ A exactly. Any layer layout works: A is concatenated along dim 0 and B
    along dim 1 (Linear, Embedding, Conv with kernel dims ``*k``).

    Semantics: A' = [A; new_a], B' = [B | 0]
    Shape: a (r, in, *k), b (out, r, *1), new_a (R - r, in, *k)
        -> a' (R, in, *k), b' (out, R, *1)
    """
    if a.shape[0] != b.shape[1] or new_a.shape[1:] != a.shape[1:]:
        raise ValueError(f"cannot grow a {tuple(a.shape)}, b {tuple(b.shape)} by rows "
                         f"{tuple(new_a.shape)}")
    zeros = b.new_zeros((b.shape[0], new_a.shape[0], *b.shape[2:]))
    return torch.cat([a, new_a.to(a)], dim=0), torch.cat([b, zeros], dim=1)


def grown_alpha(alpha: float, rank: int, new_rank: int, rslora: bool = False) -> float:
    """The alpha that keeps the scale when the rank goes from ``rank`` to ``new_rank``.

    Growing must not change the function, so s = alpha / r (or alpha / sqrt(r)) stays put
    and alpha grows with the rank instead.

    Semantics: alpha * R / r, or alpha * sqrt(R / r) when ``rslora``;
        scale(grown_alpha(alpha, r, R), R) == scale(alpha, r)
    """
    return alpha * math.sqrt(new_rank / rank) if rslora else alpha * new_rank / rank


def _acc_dtype(w: Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32
