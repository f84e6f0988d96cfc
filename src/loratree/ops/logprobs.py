"""Log-probabilities of tokens under a model's logits, with the most probable alternatives.

What the OpenAI API's ``logprobs`` (generated tokens) and ``echo`` (prompt tokens) report.
They are computed from the raw logits: the model's own distribution, before temperature,
top-k or top-p touch them (vLLM's default, ``raw_logprobs``), so a greedy request and a
sampled one report the same numbers for the same token.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["token_logprobs"]


def token_logprobs(logits: Tensor, tokens: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each position's chosen token's log-probability and its ``k`` most probable tokens.

    Semantics: ``lp = log_softmax(logits.float(), -1)``; ``chosen[t] = lp[t, tokens[t]]``;
    ``top_values[t], top_ids[t] = topk(lp[t], k)`` (descending; ties in ``topk``'s order).
    Computed in fp32 whatever the logits' dtype.
    Shape: logits ``(T, V)``, tokens ``(T,)`` long, k in [0, V] -> chosen ``(T,)``,
    top_values ``(T, k)``, top_ids ``(T, k)``.
    """
    assert logits.dim() == 2 and tokens.shape == logits.shape[:1], (
        f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} disagree")
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, tokens.to(lp.device, torch.long)[:, None])[:, 0]
    top = torch.topk(lp, k, dim=-1)
    return chosen, top.values, top.indices
