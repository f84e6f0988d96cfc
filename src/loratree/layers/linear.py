"""LoRA on a matrix multiply: ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from loratree.layers.base import LoraModule
from loratree.layers.context import SlotContext
from loratree.ops import lora as lora_ops
from loratree.ops import slots as slot_ops
from loratree.ops.slots import Segments

__all__ = ["LoraLinear"]


class LoraLinear(LoraModule):
    """``y = base(x) + s * B (A x)`` for a linear base.

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

    def add_branch(self, y: Tensor, x: Tensor, slot: int) -> Tensor:
        """y + s * ((x A^T) B^T + b), the expand, scale and add fused into one addmm."""
        a, b = self.lora_a[slot], self.lora_b[slot]
        s = self.specs[slot].scale
        h = self._dropout(x.to(a.dtype), slot).reshape(-1, self.in_features) @ a.t()  # (N, r)
        out = torch.addmm(y.reshape(-1, self.out_features), h.to(y.dtype), b.t().to(y.dtype),
                          alpha=s)  # (N, out)
        if self.has_bias(slot):
            out = out + self.lora_bias[slot].to(y.dtype) * s
        return out.view(y.shape)

    batchable = True
    dora_ok = True

    def batched_add(self, y: Tensor, flat: Tensor, slots: tuple[int, ...],
                    layout: slot_ops.Grouped) -> Tensor:
        cached = self.__dict__.get("_batched")  # dropped by set_slot
        if (cached is None or cached[0] != slots
                or (not self.static_slots  # else only set_slot changes them (and drops this)
                    and [p._version for p in cached[1]] != cached[2])):  # changed in place
            if self.static_slots:  # no version counters to keep
                cached = (slots, (), [], self._stacked_factors(slots))
            else:
                params = [self.lora_a[k] for k in slots] + [self.lora_b[k] for k in slots]
                a = [p.detach() for p in self.lora_a]
                b = [p.detach() for p in self.lora_b]
                factors = slot_ops.grouped_factors(a, b, [s.scale for s in self.specs], slots)
                cached = (slots, params, [p._version for p in params], factors)
            self.__dict__["_batched"] = cached
        if y.is_contiguous():  # y's own memory, written in place
            slot_ops.grouped_add(y.view(flat.shape[0], self.out_features), flat, *cached[3],
                                 layout)
            return y
        out = y.reshape(flat.shape[0], self.out_features)
        return slot_ops.grouped_add(out, flat, *cached[3], layout).view(y.shape)

    def _stacked_factors(self, slots: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """``ops.slots.grouped_factors`` for ``slots``, stacked from each slot's padded
        factors, which are kept until ``set_slot`` (static slots only). A request joining
        or leaving changes the batch's slots, and rebuilding every slot's factors then cost
        ~0.2 ms a layer (10 ms a packed step of SmolLM2); a stack of kept ones does not."""
        specs = self.specs
        rank = max(specs[k].rank for k in slots)
        kept = self.__dict__.setdefault("_slot_factors", {})  # set_slot drops its slot's
        at, bt = [], []
        for k in slots:
            part = kept.get((k, rank))
            if part is None:
                part = kept[(k, rank)] = slot_ops.padded_factors(
                    self.lora_a[k].detach(), self.lora_b[k].detach(), specs[k].scale, rank)
            at.append(part[0])
            bt.append(part[1])
        return torch.stack(at), torch.stack(bt)

    def trained_add(self, y: Tensor, flat: Tensor, slots: tuple[int, ...],
                    layout: slot_ops.Grouped) -> Tensor:
        lo, a0 = layout.lo, self.lora_a[slots[0]]
        out = slot_ops.grouped_branch(flat[lo:].to(a0.dtype), self.lora_a, self.lora_b,
                                      [s.scale for s in self.specs], slots).to(y.dtype)
        base = y.reshape(flat.shape[0], self.out_features)
        out = base + out if lo == 0 else torch.cat([base[:lo], base[lo:] + out])
        return out.view(y.shape)

    def runs_add(self, y: Tensor, flat: Tensor, runs: tuple[tuple[int, int, int], ...],
                 live: frozenset[int]) -> Tensor:
        out = y.reshape(-1, self.out_features)  # a view of y: rows are written in place
        for slot, lo, hi in runs:
            if slot not in live:  # the adapter skips this layer
                continue
            a, b = self.lora_a[slot], self.lora_b[slot]
            h = flat[lo:hi].to(a.dtype) @ a.t()  # (n, r)
            rows = out[lo:hi]
            torch.addmm(rows, h.to(out.dtype), b.t().to(out.dtype),
                        alpha=self.specs[slot].scale, out=rows)
        return out.view(y.shape)

    def mixed(self, flat: Tensor, seg: Segments) -> Tensor:
        for slot in seg.slots:
            self._check_slot(slot)
        a0 = self.lora_a[seg.slots[0]]
        flat = flat.to(a0.dtype)
        dropout = [s.dropout for s in self.specs]
        h = slot_ops.shrink(flat, self.lora_a, seg, dropout, self.training)
        y = flat.new_zeros((seg.n_tokens, self.out_features))
        return slot_ops.expand(y, h, self.lora_b, [s.scale for s in self.specs], seg)

    def to_weight_layout(self, delta: Tensor) -> Tensor:
        return delta.t() if self.fan_in_fan_out else delta  # Conv1D stores (in, out)
