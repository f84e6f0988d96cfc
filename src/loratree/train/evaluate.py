"""Held-out evaluation: token loss, and exact match of greedy generations."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from loratree import surgery
from loratree.models.chat import (
    Conversation,
    Example,
    encode,
    encode_prompt,
    prompt_messages,
    reference,
)
from loratree.train.data import collate, pad_token_id, read_jsonl
from loratree.train.greedy import greedy_tokens, left_padded, stop_tokens, supports_greedy
from loratree.train.steps import label_tokens, loss_sum

__all__ = ["eval_loss", "exact_match", "file_loss", "generate"]


@torch.no_grad()
def eval_loss(
    model: nn.Module, examples: Sequence[Example], *, batch_size: int, pad_id: int,
    device: torch.device, precision: str = "fp32",
) -> float:
    """Mean next-token loss over every labelled token of ``examples``."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id).items()}
        total += loss_sum(model, batch, precision).item()
    model.train(was_training)
    return total / max(label_tokens(examples), 1)


def file_loss(model: nn.Module, tokenizer, path: str, *, max_length: int = 256,
              batch_size: int = 8) -> float:
    """Mean loss over the labelled tokens of a JSONL file (as ``loratree train`` reads it)."""
    examples = encode(read_jsonl(path), tokenizer, max_length).examples
    device = next(model.parameters()).device
    return eval_loss(model, examples, batch_size=batch_size, pad_id=pad_token_id(tokenizer),
                     device=device)


@torch.no_grad()
def generate(
    model: nn.Module, tokenizer, conversations: Sequence[Conversation], *,
    max_new_tokens: int, batch_size: int = 16, device: torch.device | None = None,
    slots: Sequence[int] | None = None,
) -> list[str]:
    """Greedy completions of each conversation's prompt (its turns before the last answer).

    ``slots`` (one per conversation) runs each row through its own adapter slot, so the
    conversations of several adapters share batches; without it the model's current slot
    selection applies. A row leaves its batch as soon as it stops (``train.greedy``);
    models with a prefix adapter, or whose forward takes no positions, use
    ``transformers``' ``generate``, which gives the same tokens."""
    device = device or next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    answers: list[str] = []
    own_loop = supports_greedy(model)
    stop = stop_tokens(model, tokenizer)
    for i in range(0, len(conversations), batch_size):
        prompts = [encode_prompt(prompt_messages(c), tokenizer)
                   for c in conversations[i : i + batch_size]]
        batch_slots = None if slots is None else slots[i : i + batch_size]
        if own_loop:
            tokens = greedy_tokens(model, prompts, max_new_tokens=max_new_tokens, pad_id=pad,
                                   stop=stop, device=device, slots=batch_slots)
        else:
            tokens = _hf_generate(model, prompts, max_new_tokens=max_new_tokens, pad_id=pad,
                                  device=device, slots=batch_slots)
        answers += tokenizer.batch_decode(tokens, skip_special_tokens=True)
    model.train(was_training)
    return [a.strip() for a in answers]


def _hf_generate(model: nn.Module, prompts: list[list[int]], *, max_new_tokens: int,
                 pad_id: int, device: torch.device, slots: Sequence[int] | None
                 ) -> list[list[int]]:
    """``transformers``' greedy ``generate`` over one left-padded batch: the new tokens of
    each row (the finished rows padded on to the batch's end)."""
    ids, mask = left_padded(prompts, pad_id)
    use = (contextlib.nullcontext() if slots is None
           else surgery.context(model).use(torch.tensor(list(slots), device=device)))
    with use:
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_id)
    return out[:, ids.shape[1]:].tolist()


def exact_match(
    model: nn.Module, tokenizer, conversations: Sequence[Conversation], *, max_new_tokens: int,
    device: torch.device | None = None, slots: Sequence[int] | None = None,
    batch_size: int = 16,
) -> tuple[float, list[tuple[str, str]]]:
    """Fraction of greedy answers equal to the reference (whitespace-stripped), and the
    (answer, reference) pairs; ``slots`` and ``batch_size`` as in ``generate``."""
    answers = generate(model, tokenizer, conversations, max_new_tokens=max_new_tokens,
                       device=device, slots=slots, batch_size=batch_size)
    refs = [reference(c).strip() for c in conversations]
    hits = sum(a == r for a, r in zip(answers, refs, strict=True))
    return hits / max(len(refs), 1), list(zip(answers, refs, strict=True))
