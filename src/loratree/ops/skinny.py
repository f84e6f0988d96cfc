"""A linear map over few rows (a decode step): the two GEMM orientations.

``F.linear`` hands the BLAS ``x @ W^T`` with the rows of ``x`` as the GEMM's M. With M of
1-32 (one token per request in a decode step) some CPU BLAS builds run that far below
memory speed, while the same product posed the other way round, ``(W @ x^T)^T`` with the
weight's rows as M, runs up to 1.4x faster here. Which one wins depends on the BLAS, the
shape and the machine, so ``layers.skinny`` times both and keeps the faster.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["rows_first", "weight_first"]


def rows_first(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` as it is.

    Semantics: y = x @ W^T + b
    Shape: x (..., in), weight (out, in), bias (out,) -> (..., out)
    """
    return F.linear(x, weight, bias)


def weight_first(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """The same product with the weight as the GEMM's left operand; the result is made
    contiguous (a transposed view slows every op after it).

    Semantics: y = (W @ x^T)^T + b
    Shape: x (..., in), weight (out, in), bias (out,) -> (..., out)
    """
    flat = x.reshape(-1, weight.shape[1])  # (N, in)
    y = (weight @ flat.t()).t().contiguous()  # (N, out)
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], weight.shape[0])
