"""Putting LoRA layers into a model, freezing it, and reporting what was touched."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from loratree.config import LoraConfig
from loratree.errors import TargetError
from loratree.layers import (
    LoraConv,
    LoraEmbedding,
    LoraLinear,
    LoraModule,
    NF4Linear,
    SlotContext,
    SlotSpec,
)
from loratree.surgery.copies import copy_layers, saved_modules, wrap_copy
from loratree.surgery.params import all_linear_config, find_parameters, wrap_parameter
from loratree.surgery.prefix import prefix_bank, prefix_parameters, slot_count
from loratree.surgery.targets import Conv1D, adaptable_modules, find_targets, pattern_value
from loratree.surgery.tokens import token_layers, token_modules, wrap_tokens

__all__ = [
    "InjectionReport",
    "adapter_parameters",
    "context",
    "inject",
    "lora_layers",
    "replace_module",
    "reserve_slots",
    "set_trainable",
    "stack",
    "wrap",
]


@dataclass(frozen=True)
class InjectionReport:
    """What ``inject`` touched."""

    slot: int
    layers: tuple[str, ...]
    kinds: tuple[str, ...]
    trainable_params: int
    total_params: int

    def __str__(self) -> str:
        pct = 100.0 * self.trainable_params / max(self.total_params, 1)
        kinds = ", ".join(f"{k} x{self.kinds.count(k)}" for k in sorted(set(self.kinds)))
        return (
            f"slot {self.slot}: {len(self.layers)} layers ({kinds}); trainable "
            f"{self.trainable_params:,} of {self.total_params:,} parameters ({pct:.3f}%)"
        )


def lora_layers(model: nn.Module) -> dict[str, LoraModule]:
    """Every LoRA layer of the model, by the dotted name of the module it wraps."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraModule)}


def context(model: nn.Module) -> SlotContext:
    """The slot context shared by the model's LoRA layers and prefix adapters."""
    for layer in lora_layers(model).values():
        return layer.ctx
    bank = prefix_bank(model)
    if bank is not None:
        return bank.ctx
    raise ValueError("the model has no adapters; inject or load one first")


def wrap(base: nn.Module, ctx: SlotContext, name: str) -> LoraModule:
    """The LoRA wrapper for one adaptable module."""
    if Conv1D is not None and isinstance(base, Conv1D):
        return LoraLinear(base, ctx, name, fan_in_fan_out=True)
    if isinstance(base, nn.Linear | NF4Linear):
        return LoraLinear(base, ctx, name)
    if isinstance(base, nn.Embedding):
        return LoraEmbedding(base, ctx, name)
    if isinstance(base, nn.Conv1d | nn.Conv2d):
        return LoraConv(base, ctx, name)
    raise TargetError(f"{name}: cannot adapt a {type(base).__name__}")


def inject(
    model: nn.Module, config: LoraConfig, *, trainable: bool = True, names: tuple[str, ...] = ()
) -> InjectionReport:
    """Add one adapter slot, configured by ``config``, to the model.

    The first call wraps the targets; later calls add a slot to every LoRA layer (an empty,
    rank-0 slot where this adapter does not reach), so a slot index means the same
    adapter in every layer. ``names`` overrides ``config.targets`` with exact module
    names. Everything but this slot's parameters is frozen when ``trainable``.
    """
    existing = lora_layers(model)
    bank = prefix_bank(model)
    ctx = (next(iter(existing.values())).ctx if existing
           else bank.ctx if bank is not None else SlotContext())
    slot = slot_count(model)  # one numbering with prefix adapters
    for layer in existing.values():
        while layer.n_slots < slot:
            layer.add_slot(SlotSpec(0, 1.0))
    config, targets, params = _chosen(model, config, names)
    saved = _saved(model, config, set(targets) | set(existing))
    tokens = _tokens(model, config, set(targets) | set(existing) | set(saved))
    _wrap_new(model, ctx, existing, targets, params, slot)
    targets = {**targets, **{n: existing[n] for n in params}}
    # initialise in the model's module order, whatever was wrapped before, so a slot draws
    # the same random A as it would on a fresh model (fused training equals solo training)
    order = [n for n, _ in model.named_modules() if n in existing]
    for name, layer in ((n, existing[n]) for n in order):
        if name in targets:
            rank = int(pattern_value(config.rank_pattern, name, config.rank))
            alpha = pattern_value(config.alpha_pattern, name, config.alpha)
            spec = SlotSpec(rank, float(alpha), config.dropout, config.use_rslora,
                            dora=config.use_dora, bias=config.lora_bias)
        else:
            spec = SlotSpec(0, 1.0)
        layer.add_slot(spec, config.init)
    if bank is not None:
        bank.pad_to(slot + 1)
    for name in saved:  # full copies, after LoRA: they draw no random numbers
        wrap_copy(model, name, ctx).add_copy(slot)
    for name, ids in tokens.items():  # token rows start as the table's own (a no-op)
        wrap_tokens(model, name, ctx).add_rows(slot, list(ids))
    if trainable:
        set_trainable(model, slot)
    return InjectionReport(
        slot=slot,
        layers=tuple(targets),
        kinds=tuple(type(m).__name__ for m in targets.values()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in model.parameters()),
    )


def _saved(model: nn.Module, config: LoraConfig, adapted: set[str]) -> list[str]:
    """The modules ``config.modules_to_save`` selects, none of them adapted by LoRA."""
    saved = saved_modules(model, config.modules_to_save) if config.modules_to_save else []
    both = sorted(set(saved) & adapted)
    if both:
        raise TargetError(f"{both[:3]}: LoRA adapts these modules; they cannot also be "
                          "modules_to_save")
    return saved


def _tokens(model: nn.Module, config: LoraConfig, taken: set[str]
            ) -> dict[str, tuple[int, ...]]:
    """The modules ``config.trainable_token_indices`` selects, with their ids, none of them
    adapted by LoRA or fully copied."""
    tokens = token_modules(model, config.trainable_token_indices)
    both = sorted(set(tokens) & taken)
    if both:
        raise TargetError(f"{both[:3]}: LoRA or modules_to_save already adapt these modules; "
                          "they cannot also hold trainable tokens")
    return tokens


def reserve_slots(model: nn.Module, n: int, targets: tuple[str, ...] = ("all-linear",),
                  exclude: tuple[str, ...] = (), parameters: tuple[str, ...] = ()
                  ) -> list[int]:
    """Add ``n`` empty slots (rank 0 everywhere) after wrapping ``targets`` (and the
    ``parameters``, PEFT's ``target_parameters``); their indices.

    A serving slot table fills them with adapters later (``LoraModule.set_slot``), so the
    layers any adapter may touch must be wrapped now. ``all-linear`` includes the fused
    experts on the MoE families where PEFT's does (``surgery.params``).
    """
    existing = lora_layers(model)
    bank = prefix_bank(model)
    ctx = (next(iter(existing.values())).ctx if existing
           else bank.ctx if bank is not None else SlotContext())
    first = slot_count(model)
    config = LoraConfig(targets=targets, exclude=exclude, target_parameters=parameters)
    _, chosen, params = _chosen(model, config, ())
    _wrap_new(model, ctx, existing, chosen, params, 0)
    for layer in existing.values():
        while layer.n_slots < first + n:
            layer.add_slot(SlotSpec(0, 1.0))
    if bank is not None:
        bank.pad_to(first + n)
    for p in model.parameters():
        p.requires_grad_(False)
    return list(range(first, first + n))


def _wrap_new(model: nn.Module, ctx: SlotContext, existing: dict[str, LoraModule],
              targets: dict[str, nn.Module], params: tuple[str, ...], slots: int) -> None:
    """Wrap the targets and parameters not wrapped yet, each with ``slots`` empty slots
    (added to ``existing``)."""
    for name, base in targets.items():
        if name not in existing:
            layer = wrap(base, ctx, name)
            replace_module(model, name, layer)
            existing[name] = layer
    for name in params:
        if name not in existing:
            existing[name] = wrap_parameter(model, name, ctx)
    for name in (*targets, *params):
        layer = existing[name]
        while layer.n_slots < slots:
            layer.add_slot(SlotSpec(0, 1.0))


def _chosen(model: nn.Module, config: LoraConfig, names: tuple[str, ...]
            ) -> tuple[LoraConfig, dict[str, nn.Module], tuple[str, ...]]:
    """(the config as applied, the modules to adapt, the parameters to adapt): the exact
    ``names`` when given (modules and parameters), else what ``config`` selects."""
    if names:
        modules = adaptable_modules(model)
        mods = tuple(n for n in names if n in modules)
        targets = find_targets(model, tuple(f"re:{re.escape(n)}" for n in mods)) if mods else {}
        params = tuple(find_parameters(model, tuple(n for n in names if n not in modules)))
    else:
        config = all_linear_config(model, config)
        targets = find_targets(model, config.targets, config.exclude) if config.targets else {}
        params = tuple(find_parameters(model, config.target_parameters))
    if params and config.dropout:
        raise ValueError(f"dropout {config.dropout}: LoRA on a parameter ({params[0]}) "
                         "cannot drop out its input; set dropout=0 (PEFT refuses it too)")
    return config, targets, params


def adapter_parameters(model: nn.Module, slot: int | None = None) -> Iterator[nn.Parameter]:
    """The adapter parameters of one slot (or of all slots): the one way to find them.

    LoRA factors (and LoRA biases), full module copies (``modules_to_save``), token rows
    (``trainable_token_indices``), and a prefix
    adapter's encoder. Empty slots (rank 0: the adapter does
    not reach that layer) have none.
    """
    for layer in lora_layers(model).values():
        slots = range(layer.n_slots) if slot is None else (slot,)
        for s in slots:
            if layer.specs[s].rank > 0:
                yield layer.lora_a[s]
                yield layer.lora_b[s]
                if str(s) in layer.lora_magnitude:  # DoRA
                    yield layer.lora_magnitude[str(s)]
                if layer.has_bias(s):
                    yield layer.lora_bias[s]
    for layer in copy_layers(model).values():
        for s in layer.slots() if slot is None else (slot,):
            yield from layer.parameters_of(s)
    for layer in token_layers(model, tied=False).values():
        for s in layer.slots() if slot is None else (slot,):
            yield from layer.parameters_of(s)
    bank = prefix_bank(model)
    if bank is not None:
        for s in bank.slots() if slot is None else (slot,):
            yield from prefix_parameters(model, s)


def set_trainable(model: nn.Module, *slots: int) -> None:
    """Freeze every parameter except the LoRA parameters of ``slots``."""
    for p in model.parameters():
        p.requires_grad_(False)
    for s in slots:
        for p in adapter_parameters(model, s):
            p.requires_grad_(True)


def stack(model: nn.Module, slot: int, under: int) -> None:
    """Run slot ``under`` beneath ``slot`` in every LoRA layer: whenever the model runs
    ``slot``, each layer adds both branches. This is how a tree node trains on top of its
    frozen parent path (``under`` holds the composed path). Single-slot forwards only."""
    if slot == under:
        raise ValueError(f"slot {slot} cannot run on top of itself")
    for layer in lora_layers(model).values():
        layer._check_slot(slot)
        layer._check_slot(under)
        layer.under[slot] = under


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
