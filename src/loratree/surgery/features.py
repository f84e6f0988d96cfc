"""Features of prompts: the model's last hidden state mean-pooled over each prompt.

A prompt's feature is the model's last hidden state (the final norm's output, what
transformers returns as ``last_hidden_state`` and as the last of ``hidden_states``)
mean-pooled over the prompt's tokens and normalised to unit length (``ops.pooling``).
``prompt_features`` takes it with every adapter off: the trainer averages those into an
adapter's centroid (``routing.json``, ``adapters.routing_files``) and the server compares
a new prompt's feature with the centroids (``serve.router``); no second model is needed.
``pooled_features`` takes it through any slot per prompt: the server's embeddings
(``serve.embeddings``), so a prompt's embedding through the base model is its routing
feature.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from loratree.layers import SlotContext
from loratree.models.compat import forward_takes
from loratree.ops.pooling import unit_mean_pool
from loratree.surgery.inject import context
from loratree.surgery.prefix import prefix_bank

__all__ = ["pooled_features", "prompt_features"]


def prompt_features(model: nn.Module, prompts: Sequence[Sequence[int]],
                    batch_size: int = 16) -> Tensor:
    """Unit-length mean-pooled last hidden states of the base model, one per prompt.

    Semantics: f_i = normalize(mean_t h_L(prompt_i)[t]) with every adapter off.
    Shape: N prompts of token ids -> (N, hidden) fp32.
    """
    return pooled_features(model, prompts, None, batch_size)


@torch.inference_mode()
def pooled_features(model: nn.Module, prompts: Sequence[Sequence[int]],
                    slots: Sequence[int] | None = None, batch_size: int = 16,
                    max_tokens: int | None = None) -> Tensor:
    """Unit-length mean-pooled last hidden states, each prompt through its own slot.

    Semantics: f_i = normalize(mean_t h_L(prompt_i; slot_i)[t]), slot -1 (or ``slots``
    None) the base model alone. Prompts run in batches of at most ``batch_size`` prompts
    and ``max_tokens`` padded tokens (a longer prompt alone), right-padded (the padding is
    masked and never attended to), sorted by length so a batch pads little, and within a
    batch by slot (rows of one adapter adjacent).
    Shape: N prompts of token ids, N slots -> (N, hidden) fp32 on the CPU.
    """
    slots = [-1] * len(prompts) if slots is None else list(slots)
    if len(slots) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(slots)} slots")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt is empty: it has no hidden state to pool")
    ctx = _context(model)
    if ctx is None and any(s >= 0 for s in slots):
        raise ValueError("the model has no adapter slots")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Tensor | None] = [None] * len(prompts)
    for part in _batches([len(prompts[i]) for i in order], order, batch_size, max_tokens):
        part.sort(key=lambda i: slots[i])  # rows of one slot adjacent: grouped LoRA plans
        pooled = _batch(model, ctx, [list(prompts[i]) for i in part], [slots[i] for i in part])
        for i, row in zip(part, pooled, strict=True):
            out[i] = row
    if not out:
        return torch.zeros(0, 0)
    return torch.stack(out).cpu()  # type: ignore[arg-type]


def _batches(lengths: list[int], order: list[int], batch_size: int,
             max_tokens: int | None) -> list[list[int]]:
    """``order`` (ascending ``lengths``) cut into batches of at most ``batch_size`` items
    and ``max_tokens`` padded tokens (count x the last, longest length)."""
    out: list[list[int]] = []
    for i, n in zip(order, lengths, strict=True):
        last = out[-1] if out else None
        if (last is None or len(last) >= batch_size
                or (max_tokens is not None and (len(last) + 1) * n > max_tokens)):
            out.append([i])
        else:
            last.append(i)
    return out


def _batch(model: nn.Module, ctx: SlotContext | None, prompts: list[list[int]],
           slots: list[int]) -> Tensor:
    """One forward of ``prompts`` (each through its slot), pooled: (n, hidden) fp32."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts], device=device)
    mask = (torch.arange(width, device=device)[None]
            < torch.tensor([len(p) for p in prompts], device=device)[:, None]).long()
    use: int | Tensor = slots[0] if len(set(slots)) == 1 else torch.tensor(slots, device=device)
    body = None if _prefixed(model, slots) else _body(model)
    with ctx.use(use) if ctx is not None else contextlib.nullcontext():
        if body is not None:  # the last hidden state without the LM head's product
            hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
        else:  # the whole model: a prefix adapter enters through its forward hook
            head = {"logits_to_keep": 1} if forward_takes(model, "logits_to_keep") else {}
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                           **head).hidden_states[-1]
    return unit_mean_pool(hidden, mask)


def _prefixed(model: nn.Module, slots: list[int]) -> bool:
    """Whether a slot of ``slots`` holds a prefix adapter (its keys and values enter
    through a hook on the whole model, which the decoder alone would skip)."""
    bank = prefix_bank(model)
    return bank is not None and any(s >= 0 and bank.encoder(s) is not None for s in slots)


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
