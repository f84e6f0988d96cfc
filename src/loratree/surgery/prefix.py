"""Prefix adapters on a model: add them by slot, and inject their keys/values per forward.

A forward pre-hook on the model does the injection through transformers' key/value cache
(no copy of the model's classes): before the first forward of a sequence it puts every
layer's prefix keys and values in the cache (padded to the longest prefix when rows use
different ones, the padding masked out), prepends the prefix to the attention mask, and
gives the prompt tokens their positions. Later forwards of the same ``generate`` find the
prefix already in the cache and only extend the mask and positions.

Which rows use which prefix comes from the slot context shared with the LoRA layers, so
one batch may mix LoRA adapters, prefix adapters and the bare model, row by row.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from loratree.config import PrefixConfig
from loratree.layers import LoraModule, SlotContext, SlotSpec
from loratree.layers.prefix import PrefixBank, PrefixEncoder, PrefixGeometry
from loratree.models.compat import cache_kwarg, output_cache, pop_cache
from loratree.ops import prefix as ops

__all__ = [
    "BANK",
    "add_prefix",
    "clear_prefix",
    "geometry",
    "mark_external",
    "prefix_bank",
    "prefix_parameters",
    "prefix_state",
    "remove_prefixes",
    "set_prefix",
    "slot_count",
]

logger = logging.getLogger(__name__)

BANK = "loratree_prefix"
"""Attribute (submodule name) of the bank on the model."""
_STATE = "_loratree_prefix_state"
"""Attribute of a cache that already holds a prefix: (prefix mask, per-row starts)."""
EXTERNAL = "external"
"""A cache marked with ``mark_external`` is managed by its owner (a serving engine that
composes rows' caches, masks and positions itself): the hook leaves such calls alone."""


def prefix_state(cache: Any, rows: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """For a cache filled through the hook: (the prefix columns' mask ``(rows, P)``, the
    position each row's first prompt token got ``(rows,)``); ``P`` = 0 and starts 0 when
    no row had a prefix."""
    state = getattr(cache, _STATE, None)
    if state is None or state == EXTERNAL:
        return (torch.zeros(rows, 0, dtype=torch.long, device=device),
                torch.zeros(rows, dtype=torch.long, device=device))
    prefix_mask, starts = state
    return prefix_mask.long(), starts.long()


def mark_external(cache: Any) -> Any:
    """Mark ``cache`` as holding its rows' prefixes already, with mask and positions given
    by the caller: the prefix hook then passes calls through untouched."""
    setattr(cache, _STATE, EXTERNAL)
    return cache


def geometry(model: nn.Module) -> PrefixGeometry:
    """Layers, key/value heads and head dim of a transformers model, from its config."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError("prefix-tuning needs a transformers model (one with a .config)")
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if not layers or not heads:
        raise ValueError(f"{type(cfg).__name__} gives no num_hidden_layers / num_attention_heads")
    kv_heads = _kv_heads(cfg, int(heads))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return PrefixGeometry(int(layers), int(kv_heads), int(head_dim))


def _kv_heads(cfg: Any, heads: int) -> int:
    """Key/value heads as the family's config spells them: ``num_key_value_heads``
    (grouped-query); Falcon's ``multi_query`` (one shared head, outside its new decoder
    architecture) or ``num_kv_heads``; else one per query head."""
    value = getattr(cfg, "num_key_value_heads", None)
    if value:
        return int(value)
    if getattr(cfg, "multi_query", False) and not getattr(cfg, "new_decoder_architecture",
                                                          False):
        return 1
    return int(getattr(cfg, "num_kv_heads", None) or getattr(cfg, "n_head_kv", None) or heads)


def prefix_bank(model: nn.Module) -> PrefixBank | None:
    bank = getattr(model, BANK, None)
    return bank if isinstance(bank, PrefixBank) else None


def slot_count(model: nn.Module) -> int:
    """Slots the model has, LoRA and prefix together (one numbering for both kinds)."""
    lora = [m.n_slots for m in model.modules() if isinstance(m, LoraModule)]
    bank = prefix_bank(model)
    return max(max(lora, default=0), bank.n_slots if bank is not None else 0)


def add_prefix(
    model: nn.Module,
    config: PrefixConfig,
    *,
    vectors: Tensor | None = None,
    trainable: bool = True,
) -> int:
    """Add one prefix adapter in a new slot; returns the slot.

    ``vectors`` (P, L * 2 * H * D) gives its values (a loaded file); otherwise it starts
    as ``config.init`` says. With ``trainable`` every other parameter is frozen.
    """
    geo = geometry(model)
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing:
        raise ValueError("prefix-tuning does not work with gradient checkpointing: the "
                         "model drops its key/value cache there")
    bank = _ensure_bank(model, geo)
    slot = slot_count(model)
    param = next(model.parameters())
    encoder = PrefixEncoder(config.n_virtual, geo, projection=config.projection,
                            hidden=config.encoder_hidden)
    if vectors is not None:
        if config.projection:
            raise ValueError("loaded prefix vectors are folded: load them with projection=False")
        encoder.start_from(vectors.float())
    elif config.init == "vocab":
        encoder.start_from(_vocab_vectors(model, bank, config.n_virtual))
    encoder.to(device=param.device, dtype=param.dtype if param.is_floating_point() else None)
    bank.add(encoder, slot, config.positions)
    for layer in model.modules():  # keep one numbering: LoRA layers get an empty slot
        if isinstance(layer, LoraModule):
            while layer.n_slots <= slot:
                layer.add_slot(SlotSpec(0, 1.0))
    if trainable:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in encoder.parameters():
            p.requires_grad_(True)
    else:
        encoder.requires_grad_(False)
    return slot


def set_prefix(model: nn.Module, slot: int, vectors: Tensor, positions: str = "shift") -> None:
    """Put fixed prefix vectors (P, L * 2 * H * D) in ``slot`` (shared, not copied), for
    serving; the slot must exist (``reserve_slots``)."""
    geo = geometry(model)
    if slot >= slot_count(model):
        raise ValueError(f"slot {slot} does not exist; the model has {slot_count(model)}")
    if vectors.shape[1] != geo.width:
        raise ValueError(f"prefix width {vectors.shape[1]} != the model's {geo.width}")
    bank = _ensure_bank(model, geo)
    encoder = PrefixEncoder(vectors.shape[0], geo, projection=False)
    param = next(p for p in model.parameters() if p.is_floating_point())
    encoder.vectors = nn.Parameter(vectors.to(device=param.device, dtype=param.dtype),
                                   requires_grad=False)
    bank.add(encoder, slot, positions)


def clear_prefix(model: nn.Module, slot: int) -> None:
    """Take the prefix out of ``slot`` (the slot stays, empty)."""
    bank = prefix_bank(model)
    if bank is not None and bank.encoder(slot) is not None:
        bank.remove(slot)


def prefix_parameters(model: nn.Module, slot: int) -> list[nn.Parameter]:
    bank = prefix_bank(model)
    enc = bank.encoder(slot) if bank is not None else None
    return list(enc.parameters()) if enc is not None else []


def remove_prefixes(model: nn.Module) -> None:
    """Take the bank and its hook off the model (the model is as before any prefix)."""
    bank = prefix_bank(model)
    if bank is None:
        return
    bank.hook.remove()
    delattr(model, BANK)


def _ensure_bank(model: nn.Module, geo: PrefixGeometry) -> PrefixBank:
    bank = prefix_bank(model)
    if bank is not None:
        return bank
    lora = next((m for m in model.modules() if isinstance(m, LoraModule)), None)
    ctx = lora.ctx if lora is not None else SlotContext()
    bank = PrefixBank(geo, ctx)
    bank.pad_to(slot_count(model))
    setattr(model, BANK, bank)
    bank.hook = model.register_forward_pre_hook(_inject, with_kwargs=True)
    return bank


@torch.no_grad()
def _vocab_vectors(model: nn.Module, bank: PrefixBank, n: int) -> Tensor:
    """The model's own keys and values for ``n`` random vocabulary tokens, flat (n, width)."""
    vocab = model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (1, n), device=device)
    with bank.ctx.use(-1):
        cache = output_cache(model(input_ids=ids, use_cache=True))
    geo = bank.geometry
    parts = []
    for layer in cache.layers[: geo.n_layers]:
        for t in (layer.keys, layer.values):  # (1, H, n, D) -> (n, H * D)
            parts.append(t[0].permute(1, 0, 2).reshape(n, geo.token_dim))
    return torch.cat(parts, dim=1).float()


def _row_slots(ctx: SlotContext, batch: int) -> list[int]:
    if ctx.index is None:
        return [ctx.active] * batch
    index = ctx.index
    if index.shape[0] != batch:
        raise ValueError(f"slot index has {index.shape[0]} rows, the input has {batch}")
    if index.dim() == 2:
        if not bool((index == index[:, :1]).all()):
            raise ValueError("a per-token slot index cannot select prefixes: a prefix "
                             "belongs to a whole row; give one slot per row")
        index = index[:, 0]
    return index.tolist()


def _compute_dtype(model: nn.Module, device: torch.device) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(p for p in model.parameters() if p.is_floating_point()).dtype


def _inject(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
    bank = prefix_bank(model)
    assert bank is not None
    ids = kwargs.get("input_ids", args[0] if args else None)
    ref = ids if ids is not None else kwargs.get("inputs_embeds")
    if ref is None:
        return None
    batch, seq = ref.shape[0], ref.shape[1]
    kwargs = dict(kwargs)  # returning None leaves the caller's arguments as they were
    cache = pop_cache(kwargs)
    state = getattr(cache, _STATE, None) if cache is not None else None
    if state == EXTERNAL:
        return None
    if state is None:
        slots = _row_slots(bank.ctx, batch)
        if not any(s >= 0 and bank.encoder(s) is not None for s in slots):
            return None
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("the key/value cache already holds tokens without the prefix; "
                             "start the sequence with an empty cache")
        cache = cache if cache is not None else DynamicCache()
        state = _fill(model, bank, cache, slots, ref.device)
        setattr(cache, _STATE, state)
    kwargs[cache_kwarg(model)] = cache
    prefix_mask, starts = state
    p = prefix_mask.shape[1]
    before = cache.get_seq_length() - p  # prompt tokens already in the cache
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch, before + seq, dtype=torch.long, device=ref.device)
    if mask.dim() != 2:
        raise ValueError(f"prefix adapters need a 2-D attention mask, got {tuple(mask.shape)}")
    if mask.shape[1] == before + seq:
        full = ops.extend_mask(prefix_mask, mask, seq)
    elif mask.shape[1] == p + before + seq:
        full, mask = mask, mask[:, p:]
    else:
        raise ValueError(f"attention mask of length {mask.shape[1]} fits neither the prompt "
                         f"({before + seq}) nor prefix + prompt ({p + before + seq})")
    kwargs["attention_mask"] = full
    positions = kwargs.get("position_ids")
    if positions is None:
        positions = ops.prompt_positions(mask, torch.zeros_like(starts), shift=False)[:, -seq:]
    kwargs["position_ids"] = positions + starts.unsqueeze(1)
    if kwargs.get("cache_position") is not None:
        # transformers < 5.4 passes cache columns from generate(), counted without the
        # prefix; the prefix takes the first p columns of every row
        kwargs["cache_position"] = kwargs["cache_position"] + p
    return args, kwargs


def _fill(model: nn.Module, bank: PrefixBank, cache: Any, slots: list[int],
          device: torch.device) -> tuple[Tensor, Tensor]:
    """Put the rows' prefixes in ``cache``; returns (prefix mask, per-row position start)."""
    geo = bank.geometry
    dtype = _compute_dtype(model, device)
    vectors: dict[int, Tensor] = {}
    for s in dict.fromkeys(slots):
        enc = bank.encoder(s) if s >= 0 else None
        if enc is not None:
            vectors[s] = enc().to(dtype)
    if len(set(slots)) == 1:  # every row the same prefix: expanded views, no padding
        e = vectors[slots[0]]
        kv = ops.layer_kv(e, geo.n_layers, geo.n_heads, geo.head_dim, len(slots))
        prefix_mask = torch.ones(len(slots), e.shape[0], dtype=torch.long, device=device)
    else:
        kv, prefix_mask = ops.pad_prefixes([vectors.get(s) for s in slots], geo.n_layers,
                                           geo.n_heads, geo.head_dim)
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    lengths = prefix_mask.sum(1)
    shift = torch.tensor([bank.modes.get(s, "shift") == "shift" for s in slots], device=device)
    return prefix_mask, torch.where(shift, lengths, torch.zeros_like(lengths))
