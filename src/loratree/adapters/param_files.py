"""Adapted parameters (PEFT's ``target_parameters``) in adapter files: their keys, checks
and layout.

PEFT names a targeted parameter's factors after the module that owns it, nesting one
wrapper per targeted parameter of that module in registration order (``peft_format.
wrapper_path``): with ``gate_up_proj`` and ``down_proj`` of ``mlp.experts`` both targeted,
``mlp.experts.base_layer.lora_A.weight`` is ``gate_up_proj``'s and ``mlp.experts.lora_A.
weight`` is ``down_proj``'s. Which parameter a key means therefore depends on the model and
the config together; these helpers resolve it, and check each parameter's tensors by its
own name.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from torch import Tensor, nn

from loratree.adapters.peft_format import (
    param_factors_from_peft,
    param_factors_to_peft,
    peft_key,
    wrapper_path,
)
from loratree.config import LoraConfig
from loratree.errors import CorruptFileError, ShapeMismatchError
from loratree.layers import LoraParam, SlotContext
from loratree.surgery.params import parameter_owners
from loratree.surgery.targets import pattern_value

__all__ = ["check_param_pair", "param_paths", "param_tensors", "target_parameter_names"]


def param_paths(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """Full parameter name -> the module path PEFT keeps its factors under, for the
    targeted parameters ``names`` (all of one adapter)."""
    owners = parameter_owners(model)
    by_owner: dict[str, list[str]] = {}
    for name in names:
        by_owner.setdefault(name.rpartition(".")[0], []).append(name)
    paths = {}
    for owner_name, group in by_owner.items():
        order = list(owners[group[0]][0]._parameters)  # registration order
        group.sort(key=lambda n: order.index(n.rpartition(".")[2]))
        for i, name in enumerate(group):
            paths[name] = wrapper_path(owner_name, len(group) - 1 - i)
    return paths


def check_param_pair(label: str | Path, name: str, owner: nn.Module, a: Tensor, b: Tensor,
                     config: LoraConfig) -> tuple[Tensor, Tensor]:
    """A targeted parameter's (A, B) as PEFT stores them, checked against the parameter
    and the config (typed errors naming the parameter), in our layout."""
    label = Path(label).name
    if not (a.is_floating_point() and b.is_floating_point()):
        raise CorruptFileError(f"{label}: {name!r} holds {a.dtype} / {b.dtype} weights; LoRA "
                               "weights are floating point")
    layer = LoraParam(owner, name.rpartition(".")[2], SlotContext(), name)
    experts, fan_in, fan_out = layer.experts, layer.in_features, layer.out_features
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise ShapeMismatchError(f"{label}: {name!r} lora_A {tuple(a.shape)} and lora_B "
                                 f"{tuple(b.shape)} do not share a rank")
    if a.shape[1] != fan_in or b.shape[0] != fan_out:
        raise ShapeMismatchError(
            f"{label}: {name!r} lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
            f"the parameter ({experts} experts of in {fan_in}, out {fan_out})")
    rank = int(pattern_value(config.rank_pattern, name, config.rank))
    if a.shape[0] != rank * experts:
        per = f"{a.shape[0] / experts:g}"
        raise ShapeMismatchError(
            f"{label}: parameter {name!r} has rank {per} per expert ({a.shape[0]} rows of "
            f"lora_A for {experts} experts), the config says {rank}")
    return param_factors_from_peft(a, b, experts)


def param_tensors(model: nn.Module, layers: dict[str, LoraParam], slot: int
                  ) -> dict[str, Tensor]:
    """PEFT's keys and tensors for slot ``slot`` of the adapted parameters ``layers``."""
    tensors = {}
    for name, path in param_paths(model, layers).items():
        layer = layers[name]
        a, b = param_factors_to_peft(layer.lora_a[slot].detach(), layer.lora_b[slot].detach())
        tensors[peft_key(path, "a", False)] = a.cpu()
        tensors[peft_key(path, "b", False)] = b.cpu()
    return tensors


def target_parameter_names(model: nn.Module, names: list[str]) -> list[str]:
    """The shortest PEFT ``target_parameters`` that selects exactly ``names``: the last k
    parts of each name, for the smallest k that selects no other parameter."""
    everything = list(parameter_owners(model))
    wanted = set(names)
    for k in range(1, max(n.count(".") for n in names) + 2):
        suffixes = sorted({".".join(n.split(".")[-k:]) for n in names})
        selected = {n for n in everything
                    if any(n == s or n.endswith("." + s) for s in suffixes)}
        if selected == wanted:
            return suffixes
    return sorted(names)
