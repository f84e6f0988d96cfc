"""LoRA on a convolution (``nn.Conv1d``, ``nn.Conv2d``).

A is a convolution with the base's kernel, stride, padding and dilation, to r channels;
B is a 1x1 convolution back to the base's out channels (PEFT's layout). A slot applies to
a whole sample, so a slot index for conv layers is per row.

DoRA works here as PEFT computes it: the weight ``(out, in, *k)`` read as the matrix
``(out, in * k)``, so the norm of an output channel is over all its kernel weights; the
factor ``g`` and the bias broadcast over the channels (dim 1); PEFT's file keeps the
magnitude as ``(1, out, 1)`` (Conv1d) or ``(1, out, 1, 1)`` (Conv2d).
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

    dora_ok = True

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
        x = self._dropout(x.to(self.lora_a[slot].dtype), slot)
        return self.undropped_branch(x, slot)

    def undropped_branch(self, x: Tensor, slot: int) -> Tensor:
        a, b, base = self.lora_a[slot], self.lora_b[slot], self.base
        h = self._conv(x.to(a.dtype), a, None, base.stride, base.padding,
                       base.dilation)  # (B, r, *L')
        return self._conv(h, b) * self.specs[slot].scale  # (B, out, *L')

    def to_weight_layout(self, delta: Tensor) -> Tensor:
        return delta.reshape(self.base.weight.shape)  # (out, in * k) -> (out, in, *k)

    # -- per output channel (DoRA) --------------------------------------------------------
    def weight_matrix(self, w: Tensor) -> Tensor:
        return w.reshape(w.shape[0], -1)  # (out, in, *k) -> (out, in * k)

    def feature_view(self, v: Tensor) -> Tensor:
        return v.view(-1, *(1 for _ in self.kernel))  # (out,) -> (out, 1, ...): channels

    def token_rows(self, y: Tensor, n: int) -> Tensor:
        return y  # (B, out, *L'): a token is a row

    def magnitude_shape(self, out: int) -> tuple[int, ...]:
        return (1, out, *(1 for _ in self.kernel))

    def base_map(self, x: Tensor, w: Tensor) -> Tensor:
        base = self.base
        return self._conv(x, self.to_weight_layout(w), None, base.stride, base.padding,
                          base.dilation)
