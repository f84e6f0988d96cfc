"""A decode step that also prefills the joining requests: one forward, one sequence.

A request that joins a running batch would otherwise be prefilled in a forward of its own,
and on a CPU (where a step's cost is mostly reading the weights) that forward costs about
as much as two or three decode steps, during which the running rows wait. Packed, the
running rows' next tokens and the joiners' prompts go through the model as one sequence
of ``B + P_1 + ... + P_G`` tokens, so the weights are read once for both.

Layout: the batch's cache ``(B, H, L, D)`` becomes one row of ``B * L`` entries, each owned
by its request (padding by none); the step's tokens are appended after them. A 4-D mask
(``ops.packing.packed_mask``) lets each token see its own request's cached entries and its
own request's new tokens up to its position; positions are given per token, so every token
gets exactly the rotary position it has alone. Afterwards the running rows' new entries go
back into the batch cache and each joiner's entries become a batch row of its own.

Used where the model takes a 4-D mask as given, ``position_ids`` and tensor
``logits_to_keep`` (transformers' masking utilities, sdpa or eager attention); prefix
adapters, whose entries the prefix hook puts into a fresh cache, join through their own
prefill. Sliding-window layers get the mask narrowed to their window, counted in each
request's own sequence indices (its cache columns, then its new tokens): one mask when every
layer slides, else one per layer type (``{"full_attention": ..., "sliding_attention": ...}``,
the mapping transformers' hybrid models take).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from loratree.models.attention import layer_windows
from loratree.ops.packing import additive, packed_mask, windowed
from loratree.serve.kv import BatchKV, GrowingLayer
from loratree.surgery.prefix import mark_external

__all__ = ["Packed", "pack", "supports_packing"]


def supports_packing(model: nn.Module) -> bool:
    """Whether ``model`` runs a packed step exactly (see the module docstring)."""
    params = inspect.signature(type(model).forward).parameters
    config = getattr(model, "config", None)
    if config is None or not {"logits_to_keep", "position_ids", "attention_mask"} <= set(params):
        return False
    windows = set(layer_windows(model))
    if len(windows - {None}) > 1:
        return False  # one window for all sliding layers is what a config can say
    if None in windows and len(windows) > 1 and not getattr(config, "layer_types", None):
        return False  # full and sliding layers, but no per-type mask mapping
    return getattr(config, "_attn_implementation", None) in ("sdpa", "eager")


@dataclass
class Packed:
    """The inputs of one packed forward and what it needs to split the result."""

    input_ids: Tensor
    """(1, T) token ids: the running rows' last tokens, then each joiner's prompt."""
    position_ids: Tensor
    """(1, T) each token's position in its own request."""
    attention_mask: Tensor | dict[str, Tensor]
    """(1, 1, T, S + T) bool (or additive for eager attention); per layer type when the
    model mixes full and sliding-window layers."""
    logits_to_keep: Tensor
    """(B + G,) where each running row's and each joiner's next-token logits are."""
    cache: DynamicCache
    """The batch's entries as one row, marked as managed here (no prefix hook)."""
    rows: int
    cached: int
    prompt_lens: tuple[int, ...]

    def forward_kwargs(self) -> dict[str, object]:
        return {"input_ids": self.input_ids, "position_ids": self.position_ids,
                "attention_mask": self.attention_mask, "logits_to_keep": self.logits_to_keep,
                "use_cache": True}

    def new_entries(self, cache: DynamicCache) -> tuple[list[tuple[Tensor, Tensor]], BatchKV]:
        """After the forward: per layer, the running rows' new keys and values
        ``(B, H, 1, D)``, and the joiners' caches as a batch (right-aligned)."""
        b, s = self.rows, self.cached
        step = []
        for layer in cache.layers:
            k, v = layer.keys[0, :, s:s + b], layer.values[0, :, s:s + b]  # (H, B, D)
            step.append((k.transpose(0, 1).unsqueeze(2), v.transpose(0, 1).unsqueeze(2)))
        joined: BatchKV | None = None
        start = s + b
        for n in self.prompt_lens:
            keys = [layer.keys[:, :, start:start + n] for layer in cache.layers]
            values = [layer.values[:, :, start:start + n] for layer in cache.layers]
            one = BatchKV(keys, values, torch.ones(1, n, dtype=torch.long,
                                                   device=self.input_ids.device))
            joined = one if joined is None else joined.join(one)
            start += n
        assert joined is not None
        return step, joined


def pack(kv: BatchKV, tokens: list[int], positions: list[int], prompts: list[list[int]],
         mask_dtype: torch.dtype | None = None,
         windows: tuple[int | None, ...] = ()) -> Packed:
    """The packed forward for a batch (cache ``kv``, each row's last token and its
    position) and the prompts of joining requests (each starting at position 0).
    ``mask_dtype``: None for a boolean mask (sdpa), else the additive mask's dtype.
    ``windows``: each layer's sliding window, None for a full layer
    (``models.attention.layer_windows``; empty: every layer full)."""
    device = kv.mask.device
    b, length = kv.mask.shape
    if len(tokens) != b or len(positions) != b:
        raise ValueError(f"{b} running rows, got {len(tokens)} tokens and "
                         f"{len(positions)} positions")
    if not prompts or any(not p for p in prompts):
        raise ValueError("a packed step needs at least one joining prompt, none empty")
    lens = [len(p) for p in prompts]
    ids = torch.tensor(tokens + [t for p in prompts for t in p], device=device)
    q_owner = torch.cat([torch.arange(b, device=device)] + [
        torch.full((n,), b + j, device=device) for j, n in enumerate(lens)])
    q_pos = torch.cat([torch.tensor(positions, device=device)] + [
        torch.arange(n, device=device) for n in lens])
    rows = torch.arange(b, device=device)[:, None].expand(b, length)
    kv_owner = torch.where(kv.mask.bool(), rows, -1).reshape(-1)
    cached_pos = torch.full_like(kv_owner, -1)  # a row's cached entries precede its queries
    mask = packed_mask(q_owner, q_pos, torch.cat([kv_owner, q_owner]),
                       torch.cat([cached_pos, q_pos]))
    window = next((w for w in windows if w is not None), None)
    masks = {"full_attention": mask}
    if window is not None:
        # sequence index: a running row's cached entries are its columns 0..L-1 (rows are
        # right-aligned and contiguous) and its new token is L; a joiner's tokens 0..n-1
        q_seq = torch.cat([torch.full((b,), length, device=device)] + [
            torch.arange(n, device=device) for n in lens])
        kv_seq = torch.arange(length, device=device).repeat(b)
        masks["sliding_attention"] = windowed(mask, q_seq, torch.cat([kv_seq, q_seq]), window)
    masks = {k: m[None, None] if mask_dtype is None else additive(m[None, None], mask_dtype)
             for k, m in masks.items()}
    final: Tensor | dict[str, Tensor] = (
        masks["full_attention"] if window is None
        else masks["sliding_attention"] if None not in windows else masks)
    cache = DynamicCache()
    cache.layers[:] = [GrowingLayer(_one_row(k), _one_row(v))
                       for k, v in zip(kv.keys, kv.values, strict=True)]
    ends = torch.tensor(lens, device=device).cumsum(0) - 1 + b
    keep = torch.cat([torch.arange(b, device=device), ends])
    return Packed(ids[None], q_pos[None], final, keep, mark_external(cache), b, b * length,
                  tuple(lens))


def _one_row(t: Tensor) -> Tensor:
    """(B, H, L, D) -> (1, H, B * L, D): row b's entries at b * L .. b * L + L - 1."""
    b, h, length, d = t.shape
    return t.transpose(0, 1).reshape(1, h, b * length, d)
