"""Full per-slot module copies (PEFT's ``modules_to_save``): find, wrap, fill."""

from __future__ import annotations

from torch import nn

from loratree.errors import TargetError
from loratree.layers import FullCopy, LoraModule, SlotContext

__all__ = ["copy_layers", "saved_modules", "wrap_copy"]


def copy_layers(model: nn.Module) -> dict[str, FullCopy]:
    """Every module that holds per-slot full copies, by the dotted name it replaces."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FullCopy)}


def saved_modules(model: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """The modules ``modules_to_save`` names select (PEFT: the name, or a suffix after a
    dot), outermost only, in model order."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(f + ".") for f in found):
            continue
        if isinstance(module, FullCopy) and name in found:
            continue
        if any(name == p or name.endswith("." + p) for p in patterns):
            found.append(name)
    return found


def wrap_copy(model: nn.Module, name: str, ctx: SlotContext) -> FullCopy:
    """The ``FullCopy`` wrapper at ``name``, wrapping the module there first if needed."""
    module = model.get_submodule(name)
    if isinstance(module, FullCopy):
        return module
    if isinstance(module, LoraModule):
        raise TargetError(f"{name}: LoRA adapts this module; it cannot also be one of "
                          "modules_to_save")
    try:
        layer = FullCopy(module, ctx, name)
    except TypeError as e:
        raise TargetError(str(e)) from e
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, layer)
    return layer
