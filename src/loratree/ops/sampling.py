"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus).

Semantics (one row): with temperature t = 0 the next token is argmax(logits). Otherwise
p = softmax(logits / t); keep the k most probable tokens (top-k, k = 0: all); keep the
smallest set of most probable tokens whose mass reaches top_p (the token that crosses the
threshold included); renormalise and draw one token with the given generator.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["filter_logits", "sample"]


def filter_logits(logits: Tensor, temperature: float, top_k: int = 0,
                  top_p: float = 1.0) -> Tensor:
    """Scaled logits with the excluded tokens at -inf, shifted so that the largest is 0.

    The shift comes before the division, so a tiny temperature sends the others to -inf
    (all mass on the argmax) instead of overflowing to inf - inf = nan.
    Shape: logits (V,) -> (V,) fp32 (computed in fp64, where a temperature down to 1e-300
    is still a number).
    """
    x = logits.double()
    x = ((x - x.max()) / temperature).float()
    if 0 < top_k < x.numel():
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = sorted_x.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
        drop = before >= top_p
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return x


def sample(logits: Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> int:
    """The next token id (see the module docstring). Shape: logits (V,)."""
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
