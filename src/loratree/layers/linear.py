"""LoRA on a matrix multiply: ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2)."""

from __future__ import annotations

from torch import Tensor, nn

from loratree.layers.base import LoraModule
from loratree.layers.context import SlotContext
from loratree.ops import lora as lora_ops
from loratree.ops.add_lora import add_lora
from loratree.ops.plan import Plan

__all__ = ["LoraLinear"]


class LoraLinear(LoraModule):
    """``y = base(x) + s * B (A x)`` for a linear base (``ops.add_lora``).

    ``fan_in_fan_out`` marks a base that stores its weight as ``(in, out)`` and computes
    ``x @ W`` (transformers' ``Conv1D``); A and B keep the usual ``(r, in)``, ``(out, r)``.
    """

    def __init__(
        self, base: nn.Module, ctx: SlotContext, name: str = "", fan_in_fan_out: bool = False
    ) -> None:
        super().__init__(base, ctx, name)
        self.fan_in_fan_out = fan_in_fan_out
        if fan_in_fan_out:
            self.in_features, self.out_features = base.weight.shape
        else:  # nn.Linear or NF4Linear (which has no float weight)
            self.in_features, self.out_features = base.in_features, base.out_features

    def a_shape(self, rank: int) -> tuple[int, ...]:
        return (rank, self.in_features)

    def b_shape(self, rank: int) -> tuple[int, ...]:
        return (self.out_features, rank)

    def tokens(self, x: Tensor) -> tuple[int, Tensor]:
        rows = x.shape[0] if x.dim() > 1 else 1
        return rows, x.reshape(-1, self.in_features)  # (N, in)

    @property
    def bias_features(self) -> int:
        return self.out_features

    def branch(self, x: Tensor, slot: int) -> Tensor:
        a, b = self.lora_a[slot], self.lora_b[slot]
        s = self.specs[slot].scale
        out = lora_ops.branch(self._dropout(x.to(a.dtype), slot), a, b, s)
        return out + self.lora_bias[slot] * s if self.has_bias(slot) else out

    def undropped_branch(self, x: Tensor, slot: int) -> Tensor:
        a, b = self.lora_a[slot], self.lora_b[slot]
        return lora_ops.branch(x.to(a.dtype), a, b, self.specs[slot].scale)

    batchable = True
    dora_ok = True

    def add_lora(self, y: Tensor, x: Tensor, plan: Plan) -> Tensor:
        return add_lora(y, x, self.derived().factors, plan)

    def to_weight_layout(self, delta: Tensor) -> Tensor:
        return delta.t() if self.fan_in_fan_out else delta  # Conv1D stores (in, out)
