"""Turn a model's plain ``nn.Linear`` layers into ``layers.SkinnyLinear`` for serving."""

from __future__ import annotations

from torch import nn

from loratree.layers.skinny import SkinnyLinear, warm

__all__ = ["skinny_linears", "warm_linears"]


def skinny_linears(model: nn.Module) -> int:
    """Give every exact ``nn.Linear`` under ``model`` (a LoRA layer's base included) the
    forward of ``SkinnyLinear``, in place, and return how many changed. Parameters, hooks
    and state-dict keys stay as they are, so the change is invisible to saving, merging
    and injection; subclasses of ``nn.Linear`` (NF4, other libraries' layers) are left
    alone. Idempotent."""
    changed = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = SkinnyLinear
            changed += 1
    return changed


def warm_linears(model: nn.Module) -> int:
    """Make the orientation choices of every ``SkinnyLinear`` under ``model`` for every
    row bucket now, in the calling thread (``layers.skinny.warm``); how many were made."""
    return warm(model.modules())
