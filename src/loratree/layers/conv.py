"""LoRA on a convolution (``nn.Conv1d``, ``nn.Conv2d``).

A is a convolution with the base's kernel, stride, padding and dilation, to r channels;
B is a 1x1 convolution back to the base's out channels (PEFT's layout). A slot applies to
a whole sample, so a slot index for conv layers is per row.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from loratree.errors import TargetError
from loratree.layers.base import LoraModule
from loratree.layers.context import SlotContext

__all__ = ["LoraConv"]


class LoraConv(LoraModule):
    """``y = conv(x, W) + s * conv1x1(conv(x, A), B)``; A ``(r, in, *k)``, B ``(out, r, 1...)``."""

    def __init__(self, base: nn.Conv1d | nn.Conv2d, ctx: SlotContext, name: str = "") -> None:
        if base.groups != 1:
            raise TargetError(f"{name}: LoRA on grouped convolutions is not supported")
        if base.padding_mode != "zeros":
            raise TargetError(f"{name}: padding_mode {base.padding_mode!r} is not supported")
        super().__init__(base, ctx, name)
        self.kernel = tuple(base.kernel_size)
        self._conv = torch.nn.functional.conv1d if len(self.kernel) == 1 else (
            torch.nn.functional.conv2d
        )

    def a_shape(self, rank: int) -> tuple[int, ...]:
        return (rank, self.base.in_channels, *self.kernel)

    def b_shape(self, rank: int) -> tuple[int, ...]:
        return (self.base.out_channels, rank, *(1 for _ in self.kernel))

    def branch(self, x: Tensor, slot: int) -> Tensor:
        a, b, base = self.lora_a[slot], self.lora_b[slot], self.base
        x = self._dropout(x.to(a.dtype), slot)
        h = self._conv(x, a, None, base.stride, base.padding, base.dilation)  # (B, r, *L')
        return self._conv(h, b) * self.specs[slot].scale  # (B, out, *L')

    def weight_matrix(self) -> Tensor:
        return self.weight.view(self.base.out_channels, -1)  # (out, in, *k) -> (out, in * k)

    def to_weight_layout(self, delta: Tensor) -> Tensor:
        return delta.reshape(self.base.weight.shape)  # (out, in * k) -> (out, in, *k)
