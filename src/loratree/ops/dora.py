"""DoRA: a LoRA update split into a learned magnitude and a normalized direction.

The adapted weight is ``W' = m * (W + s B A) / ||W + s B A||``, the norm taken over each
output row (one norm per output feature: the paper writes weights ``(in, out)`` and calls
it the column norm). The norm is a constant to autograd (the paper's section 4.3, and PEFT):
gradients reach ``m``, ``A`` and ``B`` through ``m / n`` and ``s B A x``, never through
``n``. Conventions as ``ops.lora``: ``w`` ``(out, in)``, ``a`` ``(r, in)``, ``b`` ``(out, r)``,
``m`` and ``n`` ``(out,)``. A convolution's weight ``(out, in, *k)`` enters as the matrix
``(out, in * k)``: the norm of an output channel is over all its kernel weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from loratree.ops import lora as lora_ops

__all__ = ["apply", "dropout_delta", "factor", "merged", "rescale", "unmerged",
           "unrescale", "weight_norm"]


def weight_norm(w: Tensor, a: Tensor, b: Tensor, s: float) -> Tensor:
    """The norm of each output row of the adapted weight, detached, in fp32 at least.

    Semantics: n_o = sqrt(sum_i (W + s B A)[o, i]^2)
    Shape: w (out, in), a (r, in), b (out, r) -> (out,)
    """
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        full = w.detach().to(acc) + lora_ops.delta(a.detach().to(acc), b.detach().to(acc), s)
        return torch.linalg.vector_norm(full, dim=1)


def factor(m: Tensor, n: Tensor) -> Tensor:
    """The per-output-feature factor of a DoRA slot (differentiable in ``m`` only).

    Semantics: g = m / n
    Shape: m (out,), n (out,) -> (out,)
    """
    return m / n.detach()


def rescale(y: Tensor, g: Tensor, bias: Tensor | None) -> Tensor:
    """A DoRA layer's output from the plain LoRA output of the same input.

    ``y = W x + bias + s B A x`` becomes ``bias + g * (W x + s B A x)``: only the bias keeps
    its scale. With no dropout this is exactly PEFT's ``y + (g - 1) W x + g s B A x``.

    Semantics: y' = g * (y - bias) + bias
    Shape: y (..., out), g (out,), bias (out,) or None -> (..., out); channels first
        (a convolution): y (B, out, *L), g and bias (out, 1, ...) -> (B, out, *L)
    """
    g = g.to(y.dtype)
    if bias is None:
        return y * g
    bias = bias.to(y.dtype)
    return (y - bias) * g + bias


def unrescale(y: Tensor, g: Tensor, bias: Tensor | None) -> Tensor:
    """The inverse of ``rescale``: the plain output from a DoRA output (g must be nonzero).

    Semantics: y = (y' - bias) / g + bias
    Shape: y (..., out), g (out,), bias (out,) or None -> (..., out); channels first as
        ``rescale``
    """
    g = g.to(y.dtype)
    if bias is None:
        return y / g
    bias = bias.to(y.dtype)
    return (y - bias) / g + bias


def apply(x: Tensor, w: Tensor, a: Tensor, b: Tensor, s: float, m: Tensor,
          bias: Tensor | None = None) -> Tensor:
    """A DoRA-adapted linear map (no dropout).

    Semantics: y = bias + (m / n) * (x @ W^T + s * (x @ A^T) @ B^T),
        n = weight_norm(W, A, B, s)
    Shape: x (..., in), w (out, in), a (r, in), b (out, r), m (out,), bias (out,)
        -> (..., out)
    """
    y = lora_ops.apply(x, w, a, b, s, bias)
    return rescale(y, factor(m, weight_norm(w, a, b, s)), bias)


def dropout_delta(base_xd: Tensor, lora_xd: Tensor, g: Tensor) -> Tensor:
    """What a DoRA slot adds to the base output when its input dropout is on (training).

    PEFT keeps the base output of the clean input ``x`` and adds, from the dropped-out
    input ``xd``: ``(g - 1) * W xd + g * s B A xd``. ``base_xd = W xd`` (no bias) and
    ``lora_xd = s B A xd`` are given.

    Semantics: delta = (g - 1) * base_xd + g * lora_xd
    Shape: base_xd (..., out), lora_xd (..., out), g (out,) -> (..., out); channels first
        as ``rescale``
    """
    g = g.to(base_xd.dtype)
    return (g - 1) * base_xd + g * lora_xd


def merged(w: Tensor, a: Tensor, b: Tensor, s: float, m: Tensor) -> tuple[Tensor, Tensor]:
    """Fold a DoRA slot into the weight; also returns the norm, which ``unmerged`` needs
    (the merged weight no longer tells it).

    Semantics: n = weight_norm(W, A, B, s); W' = (m / n)[:, None] * (W + s B A),
        computed in fp32 at least and returned in W's dtype
    Shape: w (out, in), a (r, in), b (out, r), m (out,) -> (W' (out, in), n (out,))
    """
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    n = weight_norm(w, a, b, s)
    full = w.to(acc) + lora_ops.delta(a.to(acc), b.to(acc), s)
    return ((m.to(acc) / n)[:, None] * full).to(w.dtype), n


def unmerged(w: Tensor, a: Tensor, b: Tensor, s: float, m: Tensor, n: Tensor) -> Tensor:
    """Take a merged DoRA slot back out of the weight, with the norm ``merged`` returned.

    Semantics: W = W' / (m / n)[:, None] - s B A
    Shape: w (out, in), a (r, in), b (out, r), m (out,), n (out,) -> (out, in)
    """
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    g = m.to(acc) / n.to(acc)
    return (w.to(acc) / g[:, None] - lora_ops.delta(a.to(acc), b.to(acc), s)).to(w.dtype)
