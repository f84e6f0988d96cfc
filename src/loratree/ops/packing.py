"""Many sequences as one: the attention mask of a packed sequence.

A packed forward runs the tokens of several requests as one row: each running request's
next token and each joining request's whole prompt, after the key/value entries those
requests already hold. Each query token may attend only to entries of its own request at
or before its own position.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["additive", "packed_mask", "windowed"]


def packed_mask(q_owner: Tensor, q_pos: Tensor, kv_owner: Tensor, kv_pos: Tensor) -> Tensor:
    """Which key/value entries each query token of a packed sequence attends to.

    Semantics: m[t, s] = kv_owner[s] == q_owner[t] and kv_pos[s] <= q_pos[t]; an entry with
    kv_owner -1 (padding) is seen by no query.
    Shape: q_owner, q_pos (T,); kv_owner, kv_pos (S,) -> (T, S) bool
    """
    same = kv_owner[None, :] == q_owner[:, None]
    return same & (kv_owner[None, :] >= 0) & (kv_pos[None, :] <= q_pos[:, None])


def windowed(mask: Tensor, q_seq: Tensor, kv_seq: Tensor, window: int) -> Tensor:
    """A packed mask narrowed to a sliding window: each query sees only the entries of the
    last ``window`` sequence indices up to its own (transformers' sliding-window rule).

    Semantics: out[t, s] = mask[t, s] and kv_seq[s] > q_seq[t] - window, where a token's
    sequence index is its column in its own request's sequence (cached columns included).
    Shape: mask (T, S) bool, q_seq (T,), kv_seq (S,) -> (T, S) bool
    """
    return mask & (kv_seq[None, :] > q_seq[:, None] - window)


def additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask as the additive one eager attention adds to its scores.

    Semantics: 0 where mask holds, the dtype's lowest finite value elsewhere.
    Shape: any -> same
    """
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        ~mask, torch.finfo(dtype).min)
