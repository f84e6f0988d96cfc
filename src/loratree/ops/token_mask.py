"""Allowed-token masks for constrained decoding: a packed bitmask applied to logits.

A grammar engine (``serve.constrain``) reports which tokens may come next as a bitmask of
32-bit words, bit ``v % 32`` of word ``v // 32`` for token ``v``. These functions unpack it
and send the disallowed tokens' logits to -inf, so that sampling (``ops.sampling``) can only
draw an allowed token, whatever its temperature, top-k or top-p.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["apply_token_mask", "unpack_token_mask"]


def unpack_token_mask(words: Tensor, vocab: int) -> Tensor:
    """The allowed tokens as booleans.

    Semantics: allowed[v] = ((words[v // 32] >> (v % 32)) & 1) == 1 for v < 32 * W, and
    False for the tokens past the words (a model vocabulary wider than the grammar's).
    Shape: words (W,) int32 -> (vocab,) bool, on ``words``' device.
    """
    assert words.dim() == 1 and words.dtype == torch.int32, (
        f"words must be (W,) int32, got {tuple(words.shape)} {words.dtype}")
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = ((words.unsqueeze(-1) >> shifts) & 1).flatten().bool()  # (W, 32) -> (32 W,)
    if bits.numel() >= vocab:
        return bits[:vocab]
    return torch.cat([bits, bits.new_zeros(vocab - bits.numel())])


def apply_token_mask(logits: Tensor, allowed: Tensor) -> Tensor:
    """``logits`` with every disallowed token at -inf (a new tensor; ``logits`` is kept).

    Semantics: out[v] = logits[v] if allowed[v] else -inf.
    Shape: logits (V,) float, allowed (V,) bool -> (V,) as logits.
    """
    assert logits.shape == allowed.shape, (
        f"logits {tuple(logits.shape)} and mask {tuple(allowed.shape)} differ")
    return logits.masked_fill(~allowed.to(logits.device), float("-inf"))
