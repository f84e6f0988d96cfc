"""LoRA on a named parameter of a module: fused MoE experts (3-D) and routers (2-D).

PEFT calls these ``target_parameters``: the module is not a linear layer, it reads one of
its parameters inside its own forward (a Qwen3-MoE ``experts`` module indexes
``gate_up_proj[e]`` per expert). The update therefore goes into the weight, not the
output: for the tokens of slot k the module runs with ``W + s[k] * dW[k]`` in place of W
(per expert e: ``W_e + s B_e A_e``), as PEFT's parametrization does.

``ParamHost`` takes the module's place in the model and holds one ``LoraParam`` per
adapted parameter, registered under the parameter's own name, so the LoRA layer of
``model.layers.0.mlp.experts.gate_up_proj`` is called exactly that. A batch whose rows use
different slots runs the module once per distinct slot over that slot's rows (the rows'
outputs put back in order): correct for any module that treats rows independently, at the
cost of one module call, and one materialised ``(E, out, in)`` update per adapted
parameter, per distinct slot.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from loratree.errors import TargetError
from loratree.layers.base import LoraModule
from loratree.layers.context import SlotContext
from loratree.ops import experts as expert_ops
from loratree.ops import lora as lora_ops

__all__ = ["LoraParam", "ParamHost"]


class LoraParam(LoraModule):
    """The slots of one adapted parameter ``owner.<param_name>``.

    A 3-D parameter ``(E, d1, d2)`` is E experts of ``(out, in) = (d1, d2)`` (``(in, out)``
    when the owner says ``is_transposed``, as PEFT reads it); a 2-D one ``(out, in)`` is one
    expert. Factors: A ``(r, E, in)``, B ``(out, r, E)`` (``ops.experts``).
    """

    def __init__(self, owner: nn.Module, param_name: str, ctx: SlotContext,
                 name: str = "") -> None:
        super().__init__(owner, ctx, name)
        del self._modules["base"]  # the owner is registered once, by its ParamHost
        self.__dict__["base"] = owner
        self.param_name = param_name
        w = getattr(owner, param_name, None)
        if not isinstance(w, Tensor) or w.dim() not in (2, 3):
            raise TargetError(f"{name}: only 2-D and 3-D parameters can be adapted, got "
                              f"{None if w is None else tuple(w.shape)}")
        self.transposed = w.dim() == 3 and bool(getattr(owner, "is_transposed", False))
        if w.dim() == 2:
            self.experts, (self.out_features, self.in_features) = 1, tuple(w.shape)
        elif self.transposed:
            self.experts, self.in_features, self.out_features = tuple(w.shape)
        else:
            self.experts, self.out_features, self.in_features = tuple(w.shape)

    def a_shape(self, rank: int) -> tuple[int, ...]:
        return (rank, self.experts, self.in_features)

    def b_shape(self, rank: int) -> tuple[int, ...]:
        return (self.out_features, rank, self.experts)

    def init_a(self, a: Tensor, rank: int, init: str) -> None:
        """As for a linear layer of fan-in ``in`` (PEFT's ``(r * E, in)`` matrix)."""
        flat = a.view(-1, self.in_features)
        if init == "gaussian":
            nn.init.normal_(flat, std=1.0 / rank)
        else:
            nn.init.kaiming_uniform_(flat, a=math.sqrt(5))

    @property
    def weight(self) -> Tensor:
        return getattr(self.base, self.param_name)

    def factor_like(self) -> tuple[torch.dtype, torch.device]:
        w = self.weight
        return w.dtype, w.device

    def delta_weight(self, slot: int) -> Tensor:
        """``s * B_e @ A_e`` for every expert, in the parameter's layout (fp32)."""
        a, b = self.lora_a[slot].float(), self.lora_b[slot].float()
        return self._shaped(expert_ops.expert_delta(a, b, self.specs[slot].scale,
                                                    self.transposed))

    def _delta(self, slot: int) -> Tensor:
        """As ``delta_weight``, in the factors' dtype and differentiable (the forward)."""
        a, b = self.lora_a[slot], self.lora_b[slot]
        return self._shaped(expert_ops.expert_delta(a, b, self.specs[slot].scale,
                                                    self.transposed))

    def _shaped(self, delta: Tensor) -> Tensor:
        return delta[0] if self.weight.dim() == 2 else delta

    def factors(self, slot: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{self.module_name}: expert factors are not one matrix "
                                  "pair; use delta_weight")

    def fold(self, slot: int, sign: float) -> None:
        """W += sign * s B_e A_e for every expert (``ops.lora.add_``)."""
        what = f"{'merging' if sign > 0 else 'unmerging'} slot {slot}"
        with self.refusing(what):
            lora_ops.add_(self.weight, self.delta_weight(slot), sign)

    @torch.no_grad()
    def switch(self, slot: int) -> None:
        """W += dW_new - dW_old, the difference formed lower slot first (as
        ``LoraModule.switch``), so X -> Y -> X adds and removes the same tensor."""
        old = self.merged
        if old is None or old == slot or not (self.specs[slot].rank and self.specs[old].rank):
            super().switch(slot)  # a plain merge, a no-op, or one plain fold
            return
        self._check_slot(slot)
        lo, hi = sorted((slot, old))
        diff = self.delta_weight(lo) - self.delta_weight(hi)
        with self.refusing(f"switching to slot {slot}"):
            lora_ops.add_(self.weight, diff, 1.0 if slot == lo else -1.0)
        self.merged = slot

    def offset(self, slot: int) -> Tensor | None:
        """What to add to the stored weight for tokens of ``slot`` (-1: the base), given
        the merged slot and a slot stacked under it; None when nothing."""
        if slot == self.merged:
            return None
        want = self._delta(slot) if 0 <= slot < self.n_slots and self.specs[slot].rank else None
        under = self.under.get(slot)
        if want is not None and under is not None and self.specs[under].rank:
            want = want + self._delta(under)
        m = self.merged
        if m is not None and self.specs[m].rank:
            have = self._delta(m)
            return -have if want is None else want - have
        return want

    def key(self, slot: int) -> int:
        """Slots with equal keys need the same weight here: the slot, or -1 for the base
        weight (the base itself, or a slot that does not touch this parameter)."""
        return slot if 0 <= slot < self.n_slots and self.specs[slot].rank else -1

    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError(f"{self.module_name}: a parameter's LoRA runs through the "
                           "module that owns the parameter (its ParamHost)")

    def extra_repr(self) -> str:
        return f"param={self.param_name}, experts={self.experts}, {super().extra_repr()}"


class ParamHost(nn.Module):
    """Stands in for a module whose parameters are adapted: ``base`` is the module, and
    each child named like one of its parameters is that parameter's ``LoraParam``."""

    def __init__(self, base: nn.Module, ctx: SlotContext) -> None:
        super().__init__()
        self.base = base
        self.ctx = ctx

    def add(self, layer: LoraParam) -> None:
        if layer.param_name in self._modules or layer.param_name == "base":
            raise TargetError(f"{layer.module_name}: the parameter is adapted already")
        self.add_module(layer.param_name, layer)

    def params(self) -> list[LoraParam]:
        return [m for m in self.children() if isinstance(m, LoraParam)]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        ctx = self.ctx
        if ctx.index is None:
            return self._run(ctx.active, args, kwargs)
        layers = self.params()
        if any(layer.under for layer in layers):
            raise RuntimeError(f"{layers[0].module_name}: a slot stacked on another runs "
                               "alone, not in a per-token mixed batch")
        if not any(layer.merged is not None or layer.live_slots() for layer in layers):
            return self.base(*args, **kwargs)
        return self._mixed(layers, args, kwargs)

    def _run(self, slot: int, args: tuple, kwargs: dict) -> Any:
        """The module with every adapted parameter as slot ``slot`` needs it."""
        weights = {}
        for layer in self.params():
            offset = layer.offset(slot)
            if offset is not None:
                w = layer.weight
                weights[layer.param_name] = w + offset.to(w.dtype)
        if not weights:
            return self.base(*args, **kwargs)
        return functional_call(self.base, weights, args, kwargs, strict=False)

    def _mixed(self, layers: list[LoraParam], args: tuple, kwargs: dict) -> Any:
        """Rows that name their slot: one module call per group of slots that need the
        same weights, over that group's rows; the outputs put back in row order."""
        x = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
        if x is None or x.dim() == 0:
            raise TypeError(f"{layers[0].module_name}: the module takes no tensor of rows")
        n = x.shape[0]
        slots = self.ctx.token_slots(self.ctx.index.shape[0], n)
        groups: dict[tuple[int, ...], list[int]] = {}
        for k in self.ctx.batch_slots():
            groups.setdefault(tuple(layer.key(k) for layer in layers), []).append(k)
        if len(groups) == 1:
            return self._run(next(iter(groups.values()))[0], args, kwargs)
        rows = expert_ops.split_rows(slots, list(groups.values()))
        outs = []
        for group, idx in zip(groups.values(), rows, strict=True):
            sub_args = tuple(_take(a, idx, n) for a in args)
            sub_kwargs = {k: _take(v, idx, n) for k, v in kwargs.items()}
            outs.append(self._run(group[0], sub_args, sub_kwargs))
        return _assemble(outs, rows, n, layers[0].module_name)


def _take(value: Any, idx: Tensor, n: int) -> Any:
    """The rows ``idx`` of a per-row tensor argument; anything else passes whole."""
    if isinstance(value, Tensor) and value.dim() and value.shape[0] == n:
        return value.index_select(0, idx)
    return value


def _assemble(outs: list[Any], rows: list[Tensor], n: int, name: str) -> Any:
    first = outs[0]
    if isinstance(first, Tensor):
        return expert_ops.place_rows(outs, rows, n)
    if isinstance(first, tuple) and all(isinstance(t, Tensor) for t in first):
        return tuple(expert_ops.place_rows([o[i] for o in outs], rows, n)
                     for i in range(len(first)))
    raise TypeError(f"{name}: cannot put a {type(first).__name__} output back in row order")
