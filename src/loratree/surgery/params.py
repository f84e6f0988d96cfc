"""Choosing parameters to adapt (PEFT's ``target_parameters``), and wrapping them.

A parameter target names a parameter of a module, ``model.layers.0.mlp.experts.gate_up_proj``;
a pattern selects it when it is the full name or a suffix after a dot (PEFT's rule). Only
2-D and 3-D parameters of modules that are not adapted as modules can be targets.

On the MoE families whose experts transformers 5 fused into 3-D parameters, PEFT 0.21
turns ``all-linear`` into: the linear layers minus the old expert and router names, plus
``target_parameters`` for the fused experts and the router, with the fused gate+up
parameter at twice the rank and alpha. ``all_linear_config`` does the same here.
"""

from __future__ import annotations

import dataclasses
import logging
import re

from torch import nn

from loratree.config import LoraConfig
from loratree.errors import TargetError
from loratree.layers import LoraModule, LoraParam, ParamHost, SlotContext

__all__ = ["all_linear_config", "find_parameters", "parameter_owners", "wrap_parameter"]

logger = logging.getLogger(__name__)

_FUSED = {
    # family -> (linear-layer names PEFT drops from all-linear, fused parameters it adds)
    "qwen2_moe": (("gate_proj", "up_proj", "down_proj", "gate"),
                  ("gate.weight", "gate_up_proj", "down_proj")),
    "mixtral": (("w1", "w2", "w3", "gate"), ("gate.weight", "gate_up_proj", "down_proj")),
}
_DOUBLED = "gate_up_proj"
"""Two v4 projections fused into one parameter: PEFT gives it rank 2r and alpha 2 alpha."""


def parameter_owners(model: nn.Module) -> dict[str, tuple[nn.Module, str, bool]]:
    """Every direct parameter of the model's modules, by full name, seen through LoRA
    wrappers: name -> (owning module, parameter name, whether a LoRA module wraps it)."""
    found: dict[str, tuple[nn.Module, str, bool]] = {}
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip):
            continue
        wrapped = isinstance(module, LoraModule | ParamHost)
        owner = module.base if wrapped else module
        if wrapped:
            skip.append(name + ".")
        prefix = name + "." if name else ""
        for pname, _ in owner.named_parameters(recurse=False):
            found[prefix + pname] = (owner, pname, isinstance(module, LoraModule))
    return found


def find_parameters(model: nn.Module, patterns: tuple[str, ...]) -> dict[str, tuple[nn.Module,
                                                                                   str]]:
    """The parameters ``patterns`` select, in model order: name -> (owner, parameter name).

    Raises ``TargetError`` naming every pattern that selects nothing, and any selected
    parameter that is not 2-D or 3-D or belongs to a module adapted as a module.
    """
    chosen: dict[str, tuple[nn.Module, str]] = {}
    owners = parameter_owners(model)
    unused = []
    for pattern in patterns:
        hits = [n for n in owners if n == pattern or n.endswith("." + pattern)]
        if not hits:
            unused.append(pattern)
        for n in hits:
            owner, pname, as_module = owners[n]
            if as_module:
                raise TargetError(f"target parameter {n!r} belongs to a module adapted as a "
                                  "module; adapt one or the other")
            if getattr(owner, pname).dim() not in (2, 3):
                raise TargetError(f"target parameter {n!r} has shape "
                                  f"{tuple(getattr(owner, pname).shape)}; only 2-D and 3-D "
                                  "parameters can be adapted")
            chosen[n] = (owner, pname)
    if unused:
        raise TargetError(f"target_parameters {unused} match no parameter of the model")
    return {n: chosen[n] for n in owners if n in chosen}


def wrap_parameter(model: nn.Module, name: str, ctx: SlotContext) -> LoraParam:
    """The LoRA layer of parameter ``name``, its owning module replaced by a ``ParamHost``
    (once per module) that holds it."""
    owner_name, _, pname = name.rpartition(".")
    parent_name, _, child = owner_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    host = getattr(parent, child) if owner_name else None
    if not isinstance(host, ParamHost):
        if host is None:
            raise TargetError(f"{name}: parameters of the top-level module cannot be adapted")
        host = ParamHost(host, ctx)
        setattr(parent, child, host)
    layer = LoraParam(host.base, pname, ctx, name)
    host.add(layer)
    return layer


def all_linear_config(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """``config`` with ``all-linear`` meaning what PEFT makes of it on this model.

    On a fused-MoE family (PEFT's table, from transformers' conversion mapping) the fused
    experts and the router join ``target_parameters``, the old expert names are excluded,
    and ``gate_up_proj`` gets rank 2r and alpha 2 alpha unless a pattern already sets them.
    Elsewhere ``config`` is returned unchanged; 3-D parameters it then leaves out are logged.
    """
    if "all-linear" not in config.targets:
        return config
    family = _family(model)
    if family is None:
        left = sorted({n.rsplit(".", 1)[-1] for n, (o, p, _) in parameter_owners(model).items()
                       if getattr(o, p).dim() == 3})
        if left:
            logger.warning("all-linear adapts linear layers only; it leaves out the 3-D "
                           "parameters %s (name them in target_parameters)", left)
        return config
    dropped, fused = _FUSED[family]
    owners = parameter_owners(model)
    present = tuple(p for p in fused if any(n == p or n.endswith("." + p) for n in owners))
    params = tuple(dict.fromkeys((*config.target_parameters, *present)))
    rank_pattern, alpha_pattern = dict(config.rank_pattern), dict(config.alpha_pattern)
    if _DOUBLED in present:
        key = rf".*\.{re.escape(_DOUBLED)}"
        rank_pattern.setdefault(key, 2 * config.rank)
        alpha_pattern.setdefault(key, 2 * config.alpha)
    return dataclasses.replace(
        config, target_parameters=params, exclude=tuple(dict.fromkeys(
            (*config.exclude, *dropped))), rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


def _family(model: nn.Module) -> str | None:
    """PEFT's MoE conversion family of the model ("qwen2_moe", "mixtral"), or None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        return None
    try:  # the table PEFT reads; private to transformers, so guarded
        from transformers.conversion_mapping import (
            _MODEL_TO_CONVERSION_PATTERN,
            get_checkpoint_conversion_mapping,
        )
    except ImportError:  # pragma: no cover - transformers < 5
        return None
    family = "mixtral" if model_type == "mixtral" else _MODEL_TO_CONVERSION_PATTERN.get(
        model_type)
    if family not in _FUSED or get_checkpoint_conversion_mapping(model_type) is None:
        return None
    return family
