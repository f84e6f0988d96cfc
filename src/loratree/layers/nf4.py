"""``NF4Linear``: a frozen linear layer whose weight is stored as packed NF4 codes.

The codes and quantization constants are buffers, so they move with ``.to()`` and save in
the state dict, and no optimizer ever sees them. The forward pass dequantizes the weight
for one matmul and drops it; the backward pass dequantizes it again rather than keep a
float copy alive between the two (the QLoRA trade: compute for memory).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from loratree.ops import nf4

__all__ = ["NF4Linear"]


class _NF4Matmul(torch.autograd.Function):
    """``x @ dequant(W)^T`` whose graph keeps only the packed weight, never a float copy."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: NF4Linear) -> Tensor:  # type: ignore[override]
        ctx.layer = layer  # the layer holds the buffers; nothing float is saved
        w = layer.dequantize(x.dtype)
        return x @ w.t()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        w = ctx.layer.dequantize(grad.dtype)
        return grad @ w, None


class NF4Linear(nn.Module):
    """``y = x dequant(W)^T + b`` with W in 4-bit NF4 (optionally double-quantized scales).

    The bias, if any, stays a frozen float parameter. ``dtype`` is the float type the
    layer was quantized from; LoRA factors on top of it use that type.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        block: int = 64,
        double: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block, self.double, self.dtype = block, double, dtype
        n = in_features * out_features
        blocks = -(-n // block)
        self.register_buffer("weight_nf4", torch.zeros((n + 1) // 2, dtype=torch.uint8,
                                                       device=device))
        if double:
            self.register_buffer("weight_absmax", torch.zeros(blocks, dtype=torch.uint8,
                                                              device=device))
            self.register_buffer("weight_absmax2", torch.zeros(-(-blocks // nf4.STATS_BLOCK),
                                                               device=device))
            self.register_buffer("weight_offset", torch.zeros((), device=device))
        else:
            self.register_buffer("weight_absmax", torch.zeros(blocks, device=device))
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                  requires_grad=False) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, *, block: int = 64, double: bool = True) -> NF4Linear:
        """Quantize an ``nn.Linear`` (its weight is read, not kept)."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    block=block, double=double, dtype=w.dtype, device=torch.device("meta"))
        layer.set_weight(nf4.quantize(w, block, double))
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def set_weight(self, q: nf4.NF4Weight) -> None:
        """Install quantized weights (replacing the buffers)."""
        if q.shape != (self.out_features, self.in_features) or q.block != self.block or (
            q.double != self.double
        ):
            raise ValueError(
                f"NF4 weight {q.shape} (block {q.block}, double {q.double}) does not fit a "
                f"{self.out_features}x{self.in_features} layer (block {self.block}, "
                f"double {self.double})"
            )
        self.weight_nf4 = q.packed
        self.weight_absmax = q.absmax
        if q.double:
            self.weight_absmax2 = q.absmax2
            self.weight_offset = q.offset

    @property
    def quantized(self) -> nf4.NF4Weight:
        """The stored weight as an :class:`NF4Weight` (views of the buffers, no copy)."""
        return nf4.NF4Weight(
            self.weight_nf4, self.weight_absmax, (self.out_features, self.in_features),
            self.block, getattr(self, "weight_absmax2", None),
            getattr(self, "weight_offset", None),
        )

    @property
    def device(self) -> torch.device:
        return self.weight_nf4.device

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The float weight ``(out, in)``: a fresh tensor each call."""
        return nf4.dequantize(self.quantized, dtype or self.dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = _NF4Matmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, block={self.block}, double={self.double}, "
                f"dtype={self.dtype}")
