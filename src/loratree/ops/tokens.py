"""Trainable token rows (PEFT's ``trainable_token_indices``): some rows of a table
``(V, dim)`` replaced by an adapter's own, for an embedding lookup or an output head.

An adapter holds ``indices`` ``(n,)`` (distinct token ids) and ``rows`` ``(n, dim)``: its
values for those rows of the table, used instead of the table's (not added to them). In an
embedding, a token whose id is one of ``indices`` looks up the adapter's row; in an output
head that shares the table (tied weights), the logits of those vocabulary columns are
``h @ rows^T``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["replace_columns", "replace_lookup", "row_positions"]


def row_positions(ids: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Where each id sits in ``indices``, and whether it is there at all.

    Semantics: ``hit[t] = ids[t] in indices``; where ``hit[t]``, ``indices[pos[t]] ==
    ids[t]`` (``pos`` is 0 elsewhere).
    Shape: ids ``(N,)`` long, indices ``(n,)`` long, distinct -> pos ``(N,)``, hit ``(N,)``.
    """
    if indices.numel() == 0:
        return torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    order = torch.argsort(indices)
    ranked = indices[order]
    at = torch.searchsorted(ranked, ids).clamp_(max=ranked.numel() - 1)
    hit = ranked[at] == ids
    return torch.where(hit, order[at], 0), hit


def replace_lookup(out: Tensor, ids: Tensor, indices: Tensor, rows: Tensor,
                   tokens: Tensor | None = None) -> Tensor:
    """An embedding output with the looked-up rows of ``indices`` replaced by ``rows``.

    Semantics: ``y[t] = rows[j]`` where ``ids[t] == indices[j]`` (and ``tokens[t]``, when
    given), else ``out[t]``. Autograd reaches ``rows`` (and ``out`` where not replaced).
    Shape: out ``(N, dim)``, ids ``(N,)``, indices ``(n,)``, rows ``(n, dim)``, tokens
    ``(N,)`` bool or None -> ``(N, dim)``.
    """
    pos, hit = row_positions(ids, indices)
    if tokens is not None:
        hit = hit & tokens
    where = hit.nonzero().squeeze(1)
    if where.numel() == 0:
        return out
    return out.index_copy(0, where, rows[pos[where]].to(out.dtype))


def replace_columns(logits: Tensor, h: Tensor, indices: Tensor, rows: Tensor,
                    bias: Tensor | None = None, tokens: Tensor | None = None) -> Tensor:
    """Head logits with the columns of ``indices`` computed from ``rows`` instead of the
    table's rows.

    Semantics: ``y[t, indices[j]] = h[t] . rows[j] (+ bias[indices[j]])`` for the tokens
    ``t`` selected by ``tokens`` (all when None); every other entry is ``logits``'.
    Shape: logits ``(N, V)``, h ``(N, dim)``, indices ``(n,)``, rows ``(n, dim)``, bias
    ``(V,)`` or None, tokens ``(N,)`` bool or None -> ``(N, V)``.
    """
    where = None if tokens is None else tokens.nonzero().squeeze(1)
    if where is not None and where.numel() == 0:
        return logits
    sub_h = h if where is None else h[where]
    cols = sub_h @ rows.to(sub_h.dtype).t()  # (m, n)
    if bias is not None:
        cols = cols + bias[indices].to(cols.dtype)
    sub = logits if where is None else logits[where]
    sub = sub.index_copy(1, indices, cols.to(sub.dtype))
    return sub if where is None else logits.index_copy(0, where, sub)
