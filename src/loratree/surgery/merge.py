"""Merge, unmerge, switch and unload: moving adapters in and out of the base weights."""

from __future__ import annotations

from torch import nn

from loratree.layers import LoraParam, ParamHost
from loratree.surgery.copies import copy_layers
from loratree.surgery.inject import lora_layers, replace_module
from loratree.surgery.prefix import remove_prefixes
from loratree.surgery.tokens import token_layers

__all__ = ["merge", "merge_and_unload", "switch", "unload", "unmerge"]


def merge(model: nn.Module, slot: int = 0) -> None:
    """Fold ``slot`` into every LoRA layer's base weight (W += s B A). Idempotent.

    All-or-nothing: every layer's A and B are checked for NaN/Inf before any weight
    changes, and ``NonFiniteError`` names the layer. Should a sum still overflow, the
    layers merged so far are unmerged again (back within rounding of the original).
    """
    for layer in lora_layers(model).values():
        layer.check_finite(slot)
    done = []
    try:
        for layer in _layers(model):
            was = layer.merged
            layer.merge(slot)
            if was is None:
                done.append(layer)
    except Exception:
        for layer in done:
            layer.unmerge()
        raise


def unmerge(model: nn.Module) -> None:
    """Take the merged slot back out of every layer. A no-op when nothing is merged."""
    for layer in _layers(model):
        layer.unmerge()


def switch(model: nn.Module, slot: int) -> None:
    """Make ``slot`` the merged adapter, by W += dW_new - dW_old in each layer."""
    layers = lora_layers(model).values()
    for layer in layers:
        if layer.specs[slot].rank:  # an empty slot holds nothing to check
            layer.check_finite(slot)
    for layer in layers:
        layer.switch(slot)
    for copy in [*copy_layers(model).values(), *token_layers(model, tied=False).values()]:
        copy.merge(slot)  # a copy or token rows swap in whole: no difference to add


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter, restoring the original modules (LoRA unmerged first) and
    taking prefix adapters and their hook off."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    for copy in [*copy_layers(model).values(), *token_layers(model, tied=False).values()]:
        copy.unmerge()
    _restore(model)
    remove_prefixes(model)
    return model


def merge_and_unload(model: nn.Module, slot: int = 0) -> nn.Module:
    """Merge ``slot`` for good and return a plain model with the original module types."""
    merge(model, slot)
    _restore(model)
    return model


def _restore(model: nn.Module) -> None:
    """Put the original modules back in place of the LoRA wrappers (a module whose
    parameters were adapted: in place of its ``ParamHost``)."""
    for name, layer in lora_layers(model).items():
        if isinstance(layer, LoraParam):
            owner = name.rpartition(".")[0]
            host = model.get_submodule(owner)
            if isinstance(host, ParamHost):
                replace_module(model, owner, host.base)
        else:
            replace_module(model, name, layer.base)
    for name, copy in [*copy_layers(model).items(), *token_layers(model).items()]:
        replace_module(model, name, copy.base)


def _layers(model: nn.Module) -> list:
    """What merges: LoRA layers, full copies, token rows (a tied head follows its
    embedding)."""
    return [*lora_layers(model).values(), *copy_layers(model).values(),
            *token_layers(model, tied=False).values()]
