"""LoRA on a stack of expert weights (a fused MoE parameter), and rows split by slot.

A fused experts parameter holds E matrices at once: ``(E, out, in)`` (each expert computes
``x @ W_e^T``, transformers' default) or ``(E, in, out)`` when stored transposed. Each
expert e gets its own rank-r update ``s * B_e @ A_e``; the factors of all experts are kept
as ``a (r, E, in)`` and ``b (out, r, E)``, so dim 0 of ``a`` (and dim 1 of ``b``) is the rank
as for every other LoRA layer. A 2-D parameter ``(out, in)`` is the case E = 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["expert_delta", "place_rows", "split_rows"]


def expert_delta(a: Tensor, b: Tensor, s: float, transposed: bool = False) -> Tensor:
    """The per-expert weight update of one adapter.

    Semantics: delta[e] = s * B_e @ A_e, with A_e = a[:, e, :] (r, in) and
    B_e = b[:, :, e] (out, r); transposed: delta[e] = (s * B_e @ A_e)^T.
    Shape: a (r, E, in), b (out, r, E) -> (E, out, in), or (E, in, out) when transposed.
    """
    assert a.dim() == 3 and b.dim() == 3 and a.shape[0] == b.shape[1] and (
        a.shape[1] == b.shape[2]), f"a {tuple(a.shape)} and b {tuple(b.shape)} do not pair"
    spec = "ore,rei->eio" if transposed else "ore,rei->eoi"
    return torch.einsum(spec, b * s, a)


def split_rows(slots: Tensor, groups: Sequence[Sequence[int]]) -> list[Tensor]:
    """The row positions of each group of slots.

    Semantics: out[g] = the positions t (ascending) with slots[t] in groups[g].
    Shape: slots (N,) integer -> one (n_g,) int64 tensor per group.
    """
    out = []
    for group in groups:
        mask = slots == group[0]
        for k in group[1:]:
            mask |= slots == k
        out.append(mask.nonzero().squeeze(1))
    return out


def place_rows(parts: Sequence[Tensor], rows: Sequence[Tensor], n: int) -> Tensor:
    """Rows computed per group, put back in the batch's order (differentiable).

    Semantics: out[rows[g][i]] = parts[g][i]; every position 0..n-1 is covered once.
    Shape: parts[g] (n_g, ...), rows[g] (n_g,) with sum n_g = n -> (n, ...).
    """
    order = torch.cat(list(rows))
    assert order.numel() == n, f"the groups cover {order.numel()} rows of {n}"
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n, device=order.device)
    return torch.cat(list(parts))[inverse]
