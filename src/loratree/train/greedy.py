"""Greedy decoding for held-out evaluation: a batch whose finished rows leave at once.

``transformers``' ``generate`` keeps every row of a batch in each decode step until the
last row stops, so a batch that mixes short and long answers (a fused evaluation's batch
holds several jobs' rows) spends most of its steps on rows that have already finished.
Here a row that produces an end-of-sequence token leaves the batch, its keys and values
dropped from the cache, and the step after it runs over the rows still going. The tokens
are those of ``generate(do_sample=False)``: the same left-padded prompt, attention mask,
positions (the mask's running count) and argmax per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from loratree import surgery
from loratree.models.compat import cache_kwarg, cache_kwargs, forward_takes

__all__ = ["greedy_tokens", "left_padded", "stop_tokens", "supports_greedy"]


def supports_greedy(model: nn.Module) -> bool:
    """Whether ``greedy_tokens`` can drive ``model``: its forward takes positions and a
    cache, and no prefix adapter is attached (the prefix hook keeps per-row state on the
    cache that dropping rows would break; those models decode with ``generate``)."""
    return (forward_takes(model, "position_ids") and forward_takes(model, cache_kwarg(model))
            and surgery.prefix_bank(model) is None)


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """The prompts as one batch, padded on the left so every prompt ends at the last
    column: ids and attention mask, both (B, T) long, T the longest prompt."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids, mask


def stop_tokens(model: nn.Module, tokenizer) -> set[int]:
    """The end-of-sequence ids ``generate`` stops at: the model's generation config's,
    else the tokenizer's."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, (list, tuple)) else {int(eos)}


@torch.no_grad()
def greedy_tokens(
    model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, pad_id: int,
    stop: set[int], device: torch.device, slots: Sequence[int] | None = None,
) -> list[list[int]]:
    """Each prompt's greedy continuation, up to ``max_new_tokens`` tokens, ending before
    its first ``stop`` token (which is not returned).

    Semantics: out[i] = argmax-decoding of prompts[i] through slot slots[i] (or the
    model's current selection when ``slots`` is None), every row as in one left-padded
    batch. Shapes: the batch is (B, T) at the prompt, then (B', 1) per step, B' the rows
    not yet stopped.
    """
    if not prompts or max_new_tokens <= 0:
        return [[] for _ in prompts]
    ids, mask = (t.to(device) for t in left_padded(prompts, pad_id))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    row_slots = None if slots is None else torch.tensor(list(slots), device=device)
    stop_ids = torch.tensor(sorted(stop), dtype=torch.long, device=device)
    alive = torch.arange(len(prompts), device=device)  # the original row of each batch row
    out: list[list[int]] = [[] for _ in prompts]
    cache = DynamicCache(config=getattr(model, "config", None))
    keep_last = {"logits_to_keep": 1} if forward_takes(model, "logits_to_keep") else {}
    step_ids, step_pos = ids, positions
    for step in range(max_new_tokens):
        use = (contextlib.nullcontext() if row_slots is None
               else surgery.context(model).use(row_slots[alive]))
        with use:
            logits = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                           use_cache=True, **cache_kwargs(model, cache), **keep_last).logits
        token = logits[:, -1].argmax(dim=-1)  # (B',)
        done = torch.isin(token, stop_ids)
        for row, t, d in zip(alive.tolist(), token.tolist(), done.tolist(), strict=True):
            if not d:
                out[row].append(t)
        going = ~done
        if step == max_new_tokens - 1 or not bool(going.any()):
            break
        last = step_pos[:, -1]
        if not bool(going.all()):
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            alive, token, mask, last = alive[keep], token[keep], mask[keep], last[keep]
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
        step_ids, step_pos = token[:, None], (last + 1)[:, None]
    return out
