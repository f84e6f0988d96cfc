"""How a LoRA layer lays out its weight and its output, for code that works per output
feature (DoRA's magnitude and norm, ``layers.dora``).

The defaults are a matrix multiply's (``nn.Linear``, transformers' ``Conv1D``): the output
has its features last, so a per-feature vector ``(out,)`` broadcasts as it is, and the
weight is an ``(out, in)`` matrix up to a transpose. A convolution (``layers.conv``) keeps
its channels at dim 1 and a weight ``(out, in, *k)``, and overrides these.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["FeatureLayout"]


class FeatureLayout:
    """Mixed into ``LoraModule``: the weight as a matrix, a feature vector shaped for the
    output, the output as token rows, PEFT's file shape of a per-feature vector."""

    def to_weight_layout(self, delta: Tensor) -> Tensor:
        """An ``(out, in)`` update in the base weight's layout; subclasses override."""
        return delta

    def weight_matrix(self, w: Tensor) -> Tensor:
        """The base weight (in its own layout) as an ``(out, in)`` matrix, the inverse of
        ``to_weight_layout`` (the identity and a transpose are their own inverses)."""
        return self.to_weight_layout(w)

    def feature_view(self, v: Tensor) -> Tensor:
        """A per-output-feature vector ``(out,)`` shaped to broadcast over the output."""
        return v

    def token_rows(self, y: Tensor, n: int) -> Tensor:
        """The layer's output as its ``n`` tokens along dim 0 (a view)."""
        return y.reshape(n, -1)

    def magnitude_shape(self, out: int) -> tuple[int, ...]:
        """PEFT's file shape of a DoRA magnitude of ``out`` features."""
        return (out,)

    def base_map(self, x: Tensor, w: Tensor) -> Tensor:
        """The base layer's map with weight matrix ``w`` ``(out, in)`` and no bias."""
        return F.linear(x, w)

    def undropped_branch(self, x: Tensor, slot: int) -> Tensor:
        """``s B A x`` of ``slot`` without dropout and without a LoRA bias."""
        raise NotImplementedError
