"""The base model's own features of prompts: what adapter routing compares.

A prompt's feature is the base model's last hidden state mean-pooled over the prompt's
tokens, every adapter off, normalised to unit length. The trainer averages them into an
adapter's centroid (``routing.json``, ``adapters.routing_files``); the server compares a
new prompt's feature with the centroids (``serve.router``). No second model is needed:
the base model is already in memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from loratree.layers import SlotContext
from loratree.surgery.inject import context

__all__ = ["prompt_features"]


@torch.inference_mode()
def prompt_features(model: nn.Module, prompts: Sequence[Sequence[int]],
                    batch_size: int = 16) -> Tensor:
    """Unit-length mean-pooled last hidden states of the base model, one per prompt.

    Semantics: f_i = normalize(mean_t h_L(prompt_i)[t]) with every adapter off.
    Shape: N prompts of token ids -> (N, hidden) fp32.
    """
    device = next(model.parameters()).device
    ctx = _context(model)
    body = _body(model)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start:start + batch_size]]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([p + [0] * (width - len(p)) for p in chunk], device=device)
        mask = (torch.arange(width, device=device)[None]
                < torch.tensor([len(p) for p in chunk], device=device)[:, None]).long()
        with ctx.use(-1) if ctx is not None else contextlib.nullcontext():
            if body is not None:  # the last hidden state without the LM head's product
                hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
            else:
                hidden = model(input_ids=ids, attention_mask=mask,
                               output_hidden_states=True).hidden_states[-1]
        pooled = (hidden.float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out).cpu()


def _body(model: nn.Module) -> nn.Module | None:
    """The decoder under a transformers LM head (``base_model``), whose output's
    ``last_hidden_state`` is the LM's last hidden state; None where there is no such
    part (the full model then runs, its logits discarded)."""
    body = getattr(model, "base_model", None)
    return body if isinstance(body, nn.Module) and body is not model else None


def _context(model: nn.Module) -> SlotContext | None:
    """The shared slot context, or None on a model without adapters (nothing to switch off)."""
    try:
        return context(model)
    except ValueError:
        return None
