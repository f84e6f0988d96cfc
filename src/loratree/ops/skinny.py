"""A linear map over few rows (a decode step): the two GEMM orientations.

``F.linear`` hands the BLAS ``x @ W^T`` with the rows of ``x`` as the GEMM's M. With M of
1-32 (one token per request in a decode step) some CPU BLAS builds run that far below
memory speed, while the same product posed the other way round, ``(W @ x^T)^T`` with the
weight's rows as M, can run faster. Which one wins depends on the BLAS, the shape and the
machine, so ``serve.cpu.orientation`` (opt-in CPU tuning) times both and keeps the
faster; for a wide weight it also times ``blocked``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BLOCK", "blocked", "rows_first", "weight_first"]

BLOCK = 512
"""Weight rows per GEMM in ``blocked``."""


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


def blocked(x: Tensor, weight: Tensor, bias: Tensor | None = None,
            block: int = BLOCK) -> Tensor:
    """``F.linear`` over blocks of ``block`` weight rows, the outputs side by side. For a
    wide weight (SmolLM2's LM head: 49152 x 576) against 4-8 rows, one GEMM over all of it
    has run far below memory speed, and in blocks of 512 rows nearer to it.

    Semantics: y[..., j:j+block] = x @ W[j:j+block]^T + b[j:j+block]
    Shape: x (..., in), weight (out, in), bias (out,) -> (..., out)
    """
    flat = x.reshape(-1, weight.shape[1])  # (N, in)
    parts = [F.linear(flat, weight[j : j + block],
                      None if bias is None else bias[j : j + block])
             for j in range(0, weight.shape[0], block)]
    return torch.cat(parts, dim=1).view(*x.shape[:-1], weight.shape[0])
