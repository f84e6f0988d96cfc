"""PEFT's ``lora_bias`` on a LoRA layer: slot k's branch is s_k (B_k A_k x + b_k).

Per token, a mixed batch adds its own slot's scaled bias; merging folds s b into the base
layer's bias (which it must have).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from loratree.errors import MergeError, NonFiniteError

if TYPE_CHECKING:
    from loratree.layers.base import LoraModule
    from loratree.layers.spec import SlotSpec

__all__ = ["add_biases", "check_base_bias", "fold_bias", "set_bias"]


def set_bias(layer: LoraModule, slot: int, spec: SlotSpec, bias: Tensor | None) -> None:
    """``set_slot``'s bias part: ``bias`` (frozen) for a spec with a LoRA bias, else none."""
    pbias = layer._modules["lora_bias"]._parameters[str(slot)]
    want = layer.bias_shape(spec)
    if want == (0,):
        if pbias.numel():
            pbias.data = pbias.new_empty(0)
    elif bias is None or tuple(bias.shape) != want:
        got = None if bias is None else tuple(bias.shape)
        raise ValueError(f"{layer.module_name}: the lora bias for slot {slot} must be "
                         f"{want}, got {got}")
    else:
        pbias.data = bias if (bias.dtype, bias.device) == (pbias.dtype, pbias.device) \
            else bias.to(pbias)
    pbias.requires_grad_(False)


def add_biases(layer: LoraModule, y: Tensor, x: Tensor) -> Tensor:
    """y plus each token's slot's scaled LoRA bias s_k b_k (none for slot -1 or a slot
    without one): one gather from a ``(S + 1, out)`` table (last row zero)."""
    biased = [k for k in layer.ctx.batch_slots() if 0 <= k < len(layer.specs)
              and layer.has_bias(k)]
    if not biased:
        return y
    rows, flat = layer.tokens(x)
    n = flat.shape[0]
    out = layer.bias_features
    zero = y.new_zeros(out)
    table = torch.stack([layer.lora_bias[k].to(y.dtype) * layer.specs[k].scale
                         if layer.has_bias(k) else zero for k in range(len(layer.specs))]
                        + [zero])
    k = layer.ctx.token_slots(rows, n)
    k = torch.where(k < 0, len(layer.specs), k)
    return y + table[k].view(y.shape)


def check_base_bias(layer: LoraModule, slot: int) -> None:
    """Refuse to merge a slot with a LoRA bias into a base layer that has no bias."""
    if layer.has_bias(slot) and getattr(layer.base, "bias", None) is None:
        raise MergeError(f"{layer.module_name}: slot {slot} has a LoRA bias but the base "
                         "layer has none to fold it into; serve it unmerged")


def fold_bias(layer: LoraModule, slot: int, sign: float) -> None:
    """base bias += sign * s * b (a slot with a LoRA bias; checked finite first)."""
    if not layer.has_bias(slot):
        return
    delta = layer.lora_bias[slot].float() * layer.specs[slot].scale
    if not torch.isfinite(delta.sum()):
        raise NonFiniteError(f"{layer.module_name}: the lora bias of slot {slot} is not "
                             "finite; the layer is unchanged")
    bias = layer.base.bias
    bias.copy_(bias.float().add_(delta, alpha=sign))
