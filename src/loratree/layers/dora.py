"""DoRA slots of a LoRA layer: the magnitude, the cached norm, and how each forward uses them.

A DoRA slot (``SlotSpec.dora``) holds A, B and a magnitude ``m`` ``(out,)``; its output is
``bias + (m / n) * (W x + s B A x)`` with ``n = ||W + s B A||`` per output row, a constant to
autograd (``ops.dora``). Every forward strategy of ``LoraModule`` first adds the plain LoRA
branches as it always does, then a DoRA slot's tokens are rescaled by their slot's
``g = m / n``: ``y <- g * (y - bias) + bias`` (other tokens are not touched). The norm is
cached per slot and recomputed when A, B, the base weight, or what is merged changes (each
optimizer step, when training).

One case runs differently: training with dropout on a DoRA slot. PEFT then keeps the base
output of the clean input and adds ``(g - 1) W xd + g s B A xd`` from the dropped-out input
``xd``, which a rescale of ``y`` cannot give; such a batch runs one matmul set per slot
(``dropout_mixed``), an extra ``W xd`` per DoRA slot.

Layers whose output keeps its features elsewhere than last (a convolution's channels at
dim 1) shape ``g`` and the bias through their ``FeatureLayout`` (``layers.layout``); the
norm is then over all of a channel's weights (``(in, *k)``), as PEFT takes it.

Functions here take the layer (``LoraLinear`` or ``LoraConv``) and never import it, so
``layers.base`` can call them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from loratree.errors import NonFiniteError, TargetError
from loratree.ops import dora as dora_ops
from loratree.ops import lora as lora_ops
from loratree.ops.plan import Plan, Uniform
from loratree.ops.slots import Segments, map_segments

if TYPE_CHECKING:
    from loratree.layers.base import LoraModule
    from loratree.layers.spec import SlotSpec

__all__ = ["add_lora", "as_vector", "base_matrix", "check", "dropout_mixed", "factor", "merge",
           "new_magnitude", "norm", "set_magnitude", "single", "take_out_merged", "unmerge"]


def _bias(layer: LoraModule) -> Tensor | None:
    """The base's bias shaped to broadcast over the layer's output, or None."""
    b = getattr(layer.base, "bias", None)
    return layer.feature_view(b) if isinstance(b, Tensor) else None


def _matrix(layer: LoraModule) -> Tensor:
    """The base weight as ``(out, in)``, as stored now (a merged slot included)."""
    return layer.weight_matrix(layer.weight)


def base_matrix(layer: LoraModule) -> Tensor:
    """The unmerged base weight ``(out, in)`` in fp32: the W of every DoRA norm, whatever
    slot is merged meanwhile."""
    w = _matrix(layer).detach().float()
    k = layer.merged
    if k is None or not layer.specs[k].rank:
        return w
    a, b = layer.factors(k)
    if layer.specs[k].dora:
        m, n = layer.lora_magnitude[str(k)].detach(), layer.dora_merged_n
        return dora_ops.unmerged(w, a, b, layer.specs[k].scale, m, n)
    return w - lora_ops.delta(a, b, layer.specs[k].scale)


def new_magnitude(layer: LoraModule, rank: int, scale: float) -> nn.Parameter:
    """PEFT's initial magnitude: the row norm of the base weight (B starts at zero, so
    ``m = n`` and a fresh DoRA slot changes nothing)."""
    w = base_matrix(layer)
    a = w.new_zeros((rank, w.shape[1]))
    m = dora_ops.weight_norm(w, a, w.new_zeros((w.shape[0], rank)), scale)
    dtype, device = layer.factor_like()
    return nn.Parameter(m.to(dtype=dtype, device=device))


def norm(layer: LoraModule, slot: int) -> Tensor:
    """``||W + s B A||`` per output row of ``slot`` (fp32, detached), cached until A, B,
    the base weight or the merged slot change."""
    a, b = layer.lora_a[slot], layer.lora_b[slot]
    w = layer.weight
    key = (a._version, b._version, a.data_ptr(), b.data_ptr(), w._version, layer.merged,
           layer.specs[slot])
    cache = layer.dora_norms  # dropped per slot by LoraModule._invalidate
    hit = cache.get(slot)
    if hit is not None and hit[0] == key:
        return hit[1]
    fa, fb = layer.factors(slot)
    n = dora_ops.weight_norm(base_matrix(layer), fa, fb, layer.specs[slot].scale)
    cache[slot] = (key, n)
    return n


def factor(layer: LoraModule, slot: int) -> Tensor:
    """``g = m / n`` of ``slot`` ``(out,)``; differentiable in the magnitude."""
    m = layer.lora_magnitude[str(slot)]
    return dora_ops.factor(m, norm(layer, slot).to(m.device))


def _g(layer: LoraModule, slot: int) -> Tensor:
    """``factor`` shaped to broadcast over the layer's output."""
    return layer.feature_view(factor(layer, slot))


def _dropout_delta(layer: LoraModule, x: Tensor, slot: int) -> Tensor:
    """PEFT's ``(g - 1) W xd + g s B A xd`` for the input ``x`` of ``slot``'s tokens."""
    xd = layer._dropout(x.to(layer.lora_a[slot].dtype), slot)
    base_xd = layer.base_map(xd, base_matrix(layer).to(xd))
    return dora_ops.dropout_delta(base_xd, layer.undropped_branch(xd, slot), _g(layer, slot))


def single(layer: LoraModule, y: Tensor, x: Tensor, slot: int) -> Tensor:
    """Every token runs DoRA slot ``slot``: ``y`` (the base output) plus its update."""
    if slot in layer.under:
        raise RuntimeError(f"{layer.module_name}: a DoRA slot does not stack on another")
    if layer.training and layer.specs[slot].dropout > 0:
        return y + _dropout_delta(layer, x, slot).to(y.dtype)
    y = layer.add_branch(y, x, slot)
    return dora_ops.rescale(y, _g(layer, slot), _bias(layer))


def add_lora(layer: LoraModule, y: Tensor, x: Tensor, plan: Plan,
             slots: frozenset[int]) -> Tensor:
    """``y`` plus the branches ``plan`` runs, the DoRA slots ``slots`` among them: one slot
    for every token (``single``), or the plain strategy, then each DoRA slot's tokens
    rescaled by its own ``g``."""
    if isinstance(plan, Uniform):
        return single(layer, y, x, plan.slot)
    rows, flat = layer.tokens(x)
    n = flat.shape[0]
    if layer.training and any(layer.specs[k].dropout for k in slots):
        return dropout_mixed(layer, y, flat, layer.ctx.segments(rows, n))
    y = layer.add_planned(y, x, plan)
    out = layer.token_rows(y, n)
    bias = _bias(layer)
    for k in sorted(slots):
        pos = layer.ctx.memo(("dora-rows", rows, n, k), lambda k=k: (
            layer.ctx.token_slots(rows, n) == k).nonzero().squeeze(1))
        part = dora_ops.rescale(out.index_select(0, pos), _g(layer, k), bias)
        if torch.is_grad_enabled():
            out = out.index_copy(0, pos, part)
        else:  # the layer's own output: written in place
            out.index_copy_(0, pos, part)
    return out.view(y.shape)


def dropout_mixed(layer: LoraModule, y: Tensor, flat: Tensor, seg: Segments) -> Tensor:
    """Training with dropout on a DoRA slot of a mixed batch: one matmul set per slot,
    each DoRA slot's tokens getting PEFT's dropout arrangement, the others their branch."""
    def update(slot: int, xs: Tensor) -> Tensor:
        if layer.specs[slot].dora:
            return _dropout_delta(layer, xs, slot)
        return layer.branch(xs, slot)

    live = layer.live_slots()
    if not any(k in live for k in seg.slots):
        return y
    for k in seg.slots:
        layer._check_slot(k)
    out = map_segments(flat, seg, lambda k, xs: update(k, xs) if k in live
                       else xs.new_zeros((xs.shape[0], y.shape[-1])))
    return y + out.reshape(y.shape).to(y.dtype)


def take_out_merged(layer: LoraModule, y: Tensor, x: Tensor) -> Tensor:
    """The plain base output from one computed with a DoRA slot merged:
    ``(y - bias) / g - s B A x + bias``, with the ``g`` of the merge."""
    k = layer.merged
    assert k is not None
    g = dora_ops.factor(layer.lora_magnitude[str(k)].detach(), layer.dora_merged_n)
    y = dora_ops.unrescale(y, layer.feature_view(g), _bias(layer))
    return y - layer.branch(x, k).to(y.dtype)


@torch.no_grad()
def merge(layer: LoraModule, slot: int) -> None:
    """W <- (m / n) * (W + s B A), keeping n for ``unmerge``; refused if not finite."""
    a, b = layer.factors(slot)
    m = layer.lora_magnitude[str(slot)].detach()
    new, n = dora_ops.merged(base_matrix(layer), a, b, layer.specs[slot].scale, m)
    _write(layer, new, f"merging DoRA slot {slot}")
    layer.dora_merged_n = n


@torch.no_grad()
def unmerge(layer: LoraModule) -> None:
    """W <- W' / (m / n) - s B A with the n kept by ``merge``."""
    k = layer.merged
    assert k is not None
    _write(layer, base_matrix(layer), f"unmerging DoRA slot {k}")
    layer.dora_merged_n = None


def _write(layer: LoraModule, matrix: Tensor, what: str) -> None:
    if not torch.isfinite(matrix.sum()):
        raise NonFiniteError(f"{layer.module_name}: {what} gives non-finite weights; the "
                             "layer is unchanged")
    w = layer.weight
    w.copy_(layer.to_weight_layout(matrix).to(w.dtype))


def set_magnitude(layer: LoraModule, slot: int, spec: SlotSpec,
                  magnitude: Tensor | None) -> None:
    """``set_slot``'s DoRA part: keep ``magnitude`` (frozen) for a DoRA spec, drop the
    slot's magnitude otherwise."""
    key = str(slot)
    if not (spec.dora and spec.rank):
        if key in layer.lora_magnitude:
            del layer.lora_magnitude[key]
        return
    check(layer)
    out = layer.b_shape(spec.rank)[0]
    magnitude = None if magnitude is None else as_vector(layer, magnitude)
    if magnitude is None or tuple(magnitude.shape) != (out,):
        got = None if magnitude is None else tuple(magnitude.shape)
        raise ValueError(f"{layer.module_name}: DoRA slot {slot} needs a magnitude of "
                         f"shape {layer.magnitude_shape(out)}, got {got}")
    dtype, device = layer.factor_like()
    layer.lora_magnitude[key] = nn.Parameter(magnitude.to(dtype=dtype, device=device),
                                            requires_grad=False)


def as_vector(layer: LoraModule, magnitude: Tensor) -> Tensor:
    """A magnitude as the layer keeps it, ``(out,)``, from PEFT's file shape
    (``layer.magnitude_shape``: a convolution's ``(1, out, 1, ...)``); another shape comes
    back unchanged, for the caller's check to name."""
    out = layer.b_shape(1)[0]
    if tuple(magnitude.shape) in ((out,), layer.magnitude_shape(out)):
        return magnitude.reshape(out)
    return magnitude


def check(layer: LoraModule) -> None:
    """Refuse a DoRA slot where it is not implemented, or where the base keeps no float
    weight to take the norm of (a quantized base)."""
    if not layer.dora_ok:
        raise TargetError(f"{layer.module_name}: DoRA is supported on linear and "
                          f"convolution layers only, not on {type(layer).__name__}")
    _ = layer.weight
