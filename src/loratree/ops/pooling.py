"""Pooling a sequence's hidden states into one vector: what routing and embeddings compare.

A padded batch holds rows of different lengths; only the real tokens (mask 1) count.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mean_pool", "unit_mean_pool"]


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """The mean of each row's hidden states over its real tokens, in fp32.

    Semantics: out[b] = sum_t mask[b, t] * hidden[b, t] / sum_t mask[b, t]
    Shape: hidden (B, T, H), mask (B, T) of 0/1 (every row at least one 1) -> (B, H) fp32
    """
    assert hidden.shape[:2] == mask.shape, (
        f"hidden {tuple(hidden.shape)} does not fit mask {tuple(mask.shape)}")
    m = mask.to(torch.float32)
    assert bool((m.sum(1) > 0).all()), "every row needs at least one real token"
    return (hidden.float() * m[..., None]).sum(1) / m.sum(1, keepdim=True)  # (B, H)


def unit_mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """``mean_pool`` scaled to unit length (cosine similarity is then a dot product).

    Semantics: out[b] = mean_pool(hidden, mask)[b] / ||mean_pool(hidden, mask)[b]||_2
    Shape: hidden (B, T, H), mask (B, T) -> (B, H) fp32
    """
    return torch.nn.functional.normalize(mean_pool(hidden, mask), dim=-1)
