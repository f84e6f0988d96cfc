"""The LoRA update on one weight matrix.

Conventions: a weight is ``(out, in)`` like ``nn.Linear``; ``a`` is ``(r, in)``,
``b`` is ``(out, r)``; ``scale`` is ``alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from loratree.ops import compose

__all__ = ["add_", "apply", "branch", "delta", "grow", "grown_alpha", "merge_", "scale",
           "switch_", "unmerge_"]


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


def add_(w: Tensor, update: Tensor, alpha: float = 1.0) -> None:
    """Add an update to a weight in place, or refuse it and leave the weight unchanged.

    One reduction checks the update: a NaN or Inf anywhere makes the sum non-finite (so
    does a sum past 3e38, an update no model survives anyway). A weight of another dtype
    than the update (bf16, fp16) is added to in fp32 and rounded once.

    Semantics: W += alpha * update; raises FloatingPointError when update is not finite.
    Shape: w (out, in) (any view; written through), update (out, in)
    """
    if not torch.isfinite(update.sum()):
        raise FloatingPointError("the update is not finite")
    if w.dtype == update.dtype:
        w.add_(update, alpha=alpha)
    else:  # low-precision weights: add in fp32, round once
        w.copy_(w.to(update.dtype).add_(update, alpha=alpha))


def merge_(w: Tensor, a: Tensor, b: Tensor, s: float) -> None:
    """Fold an adapter into the weight, in place (``add_``'s refusal and rounding).

    Semantics: W += s * B @ A, the product formed in fp32 at least.
    Shape: w (out, in), a (r, in), b (out, r)
    """
    acc = _acc_dtype(w)
    add_(w, delta(a.to(acc), b.to(acc), s))


def unmerge_(w: Tensor, a: Tensor, b: Tensor, s: float) -> None:
    """Take a merged adapter back out of the weight, in place.

    Semantics: W -= s * B @ A, the product formed in fp32 at least.
    Shape: w (out, in), a (r, in), b (out, r)
    """
    acc = _acc_dtype(w)
    add_(w, delta(a.to(acc), b.to(acc), s), -1.0)


def switch_(w: Tensor, old: tuple[Tensor, Tensor, float], new: tuple[Tensor, Tensor, float],
            new_first: bool = True) -> None:
    """Swap one merged adapter for another with one addition to the weight, in place.

    The difference of the two updates is one product of their concatenated factors
    (``ops.compose.concat``), a matmul of rank r_new + r_old, added once: each switch
    rounds W once. ``new_first`` orders the concatenation: a caller that always puts the
    same adapter first adds and removes bit-identical differences when switching back and
    forth, so the rounding is a random walk, not a bias per direction.

    Semantics: W += s_new * B_new @ A_new - s_old * B_old @ A_old
    Shape: w (out, in); old and new are (a (r, in), b (out, r), s)
    """
    acc = _acc_dtype(w)
    first, second = (new, old) if new_first else (old, new)
    a, b = compose.concat([(first[0].to(acc), first[1].to(acc), first[2]),
                           (second[0].to(acc), second[1].to(acc), second[2])],
                          weights=[1.0, -1.0])
    add_(w, b @ a, 1.0 if new_first else -1.0)  # b @ a = d_first - d_second


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
