"""Composing LoRA updates: a sum of adapters is one adapter of the summed rank.

The identity behind adapter trees (and the merged switch):
``sum_i s_i B_i A_i = [s_1 B_1 | ... | s_k B_k] [A_1; ...; A_k]``. Concatenating along the
rank axis is exact: no product is formed, so a composed path carries the same numbers as
its nodes (each B column scaled once).

Conventions: ``a`` is ``(r, in, ...)`` (rank first: linear ``(r, in)``, embedding
``(r, vocab)``, conv ``(r, in, kh, kw)``), ``b`` is ``(out, r, ...)`` (rank second).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["concat"]


def concat(factors: Sequence[tuple[Tensor, Tensor, float]],
           weights: Sequence[float] | None = None) -> tuple[Tensor, Tensor]:
    """One (A, B) pair, of scale 1, equal to the weighted sum of the given adapters.

    Semantics: B @ A = sum_i w_i * s_i * B_i @ A_i   (w_i = 1 when ``weights`` is None)
    Shape: factors [(a_i (r_i, in, ...), b_i (out, r_i, ...), s_i)]
           -> a (sum r_i, in, ...), b (out, sum r_i, ...)
    """
    if not factors:
        raise ValueError("concat needs at least one adapter")
    if weights is not None and len(weights) != len(factors):
        raise ValueError(f"{len(weights)} weights for {len(factors)} adapters")
    a0, b0, _ = factors[0]
    for a, b, _ in factors:
        if a.shape[1:] != a0.shape[1:] or b.shape[0] != b0.shape[0] or b.shape[2:] != b0.shape[2:]:
            raise ValueError(f"adapters of different layers: A {tuple(a.shape)} vs "
                             f"{tuple(a0.shape)}, B {tuple(b.shape)} vs {tuple(b0.shape)}")
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"A {tuple(a.shape)} and B {tuple(b.shape)} do not share a rank")
    ws = [1.0] * len(factors) if weights is None else list(weights)
    dtype = torch.promote_types(a0.dtype, b0.dtype)
    a = torch.cat([f[0].to(dtype) for f in factors], dim=0)
    b = torch.cat([f[1].to(dtype) * (w * f[2]) for f, w in zip(factors, ws, strict=True)],
                  dim=1)
    return a, b

