"""Quantizing a model's linear layers to NF4, and merging an adapter out of a quantized base.

``quantize`` swaps one ``nn.Linear`` at a time for an ``NF4Linear`` and lets the float
weight go, so memory falls as it works: the peak is the float model plus one layer's
temporaries. ``export_merged`` is the lossy step users ask about, done explicitly: W is
dequantized, the adapter added in fp32 (the "float merge"), and the result either kept
as float (path a) or quantized to NF4 again (path b); the report says how far the kept
weights are from the float merge.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from loratree.config import QuantConfig
from loratree.errors import TargetError
from loratree.layers import LoraLinear, NF4Linear
from loratree.models.quantized import nf4_layers
from loratree.ops import nf4
from loratree.surgery.inject import lora_layers, replace_module
from loratree.surgery.targets import find_targets

__all__ = [
    "MergeErrorReport",
    "QuantizeReport",
    "export_merged",
    "nf4_layers",
    "quantize",
]

logger = logging.getLogger(__name__)

MergeTarget = Literal["float", "nf4"]


@dataclass(frozen=True)
class QuantizeReport:
    """What ``quantize`` touched and what it saved."""

    layers: tuple[str, ...]
    params: int
    float_bytes: int
    quant_bytes: int

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.quant_bytes / max(self.params, 1)

    def __str__(self) -> str:
        return (
            f"quantized {len(self.layers)} linear layers ({self.params:,} parameters) to NF4: "
            f"{self.float_bytes / 2**20:.1f} MiB -> {self.quant_bytes / 2**20:.1f} MiB "
            f"({self.bits_per_param:.3f} bits per parameter)"
        )


@torch.no_grad()
def quantize(model: nn.Module, config: QuantConfig | None = None) -> QuantizeReport:
    """Replace the targeted ``nn.Linear`` layers by ``NF4Linear``, in place.

    Quantize the base before adding adapters. Layers already in NF4 are left alone.

    Raises:
        TargetError: a pattern matches nothing, a target is not an ``nn.Linear``, its
            weight is shared with another module (a tied output head), or the model
            already has LoRA layers.
    """
    config = config or QuantConfig()
    if lora_layers(model):
        raise TargetError("quantize the base before adding adapters: the model has LoRA layers")
    targets = find_targets(model, config.targets, config.exclude)
    shared = _shared_weights(model)
    names, params, float_bytes, quant_bytes = [], 0, 0, 0
    for name in list(targets):
        module = targets.pop(name)  # drop our reference, so the float weight can be freed
        if isinstance(module, NF4Linear):
            continue
        if type(module) is not nn.Linear:
            raise TargetError(f"{name}: only nn.Linear can be quantized to NF4, not "
                              f"{type(module).__name__}")
        if id(module.weight) in shared:
            raise TargetError(f"{name}: its weight is tied to another module; exclude it")
        layer = NF4Linear.from_linear(module, block=config.block, double=config.double)
        w = module.weight
        params += w.numel()
        float_bytes += w.numel() * w.element_size()
        quant_bytes += layer.quantized.nbytes()
        replace_module(model, name, layer)
        names.append(name)
        del module, w
    report = QuantizeReport(tuple(names), params, float_bytes, quant_bytes)
    logger.info("%s", report)
    return report


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module holds."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, v in seen.items() if v > 1}


@dataclass(frozen=True)
class MergeErrorReport:
    """How far the exported weights are from the float merge dequant(W) + s B A."""

    to: MergeTarget
    layers: int
    params: int
    max_abs: float
    mean_abs: float

    def __str__(self) -> str:
        return (
            f"merged {self.layers} quantized layers to {self.to}: weight error against the "
            f"float merge max {self.max_abs:.3e}, mean {self.mean_abs:.3e} "
            f"over {self.params:,} weights"
        )


@torch.no_grad()
def export_merged(model: nn.Module, slot: int = 0, to: MergeTarget = "float") -> MergeErrorReport:
    """Fold ``slot`` into the model for good and remove every LoRA layer, in place.

    Over an NF4 base each layer becomes an ``nn.Linear`` holding dequant(W) + s B A
    (``to="float"``, path a) or an ``NF4Linear`` of those weights quantized again
    (``to="nf4"``, path b). LoRA layers over a float base are merged as usual. One layer
    at a time, so path b never holds more than one float layer.

    Returns the error of the kept weights against the fp32 float merge.
    """
    if to not in ("float", "nf4"):
        raise ValueError(f"to must be 'float' or 'nf4', got {to!r}")
    layers = lora_layers(model)
    for layer in layers.values():
        layer.check_finite(slot)
    n_layers, count, total, worst = 0, 0, 0.0, 0.0
    for name, layer in layers.items():
        base = layer.base
        if not isinstance(base, NF4Linear):
            layer.merge(slot)
            replace_module(model, name, base)
            continue
        assert isinstance(layer, LoraLinear)
        merged = base.dequantize(torch.float32)
        if layer.specs[slot].rank:
            merged += layer.delta_weight(slot)
        new, kept = _rebuild(base, merged, to)
        err = (kept - merged).abs_()
        worst = max(worst, float(err.max()))
        total += float(err.sum(dtype=torch.float64))
        count += err.numel()
        n_layers += 1
        replace_module(model, name, new)
        del merged, kept, err
    report = MergeErrorReport(to, n_layers, count, worst, total / max(count, 1))
    logger.info("%s", report)
    return report


def _rebuild(
    base: NF4Linear, merged: torch.Tensor, to: MergeTarget
) -> tuple[nn.Module, torch.Tensor]:
    """The replacement module for merged fp32 weights, and the weights it really holds."""
    if to == "float":
        linear = nn.Linear(base.in_features, base.out_features, base.bias is not None,
                           device="meta", dtype=base.dtype)
        linear.weight = nn.Parameter(merged.to(base.dtype), requires_grad=False)
        if base.bias is not None:
            linear.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        return linear, linear.weight.float()
    q = nf4.quantize(merged, base.block, base.double)
    layer = NF4Linear(base.in_features, base.out_features, base.bias is not None,
                      block=base.block, double=base.double, dtype=base.dtype, device="meta")
    layer.set_weight(q)
    if base.bias is not None:
        layer.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
    return layer, nf4.dequantize(q, torch.float32)
