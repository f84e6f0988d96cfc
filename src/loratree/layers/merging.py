"""Merge, unmerge and switch one slot of a LoRA layer into its base weight.

The arithmetic is ``ops.lora``'s in-place ``merge_`` / ``unmerge_`` / ``switch_`` on an
``(out, in)`` view of the weight (``FeatureLayout.weight_matrix``: a view, so the
ops write through to the weight); this module decides which
applies (DoRA slots and LoRA biases have their own folds: ``layers.dora``,
``layers.lora_bias``) and keeps ``layer.merged``. Functions take the layer and never
import its class, so ``layers.base`` can call them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import Tensor

from loratree.layers import dora, lora_bias
from loratree.ops import lora as lora_ops

if TYPE_CHECKING:
    from loratree.layers.base import LoraModule

__all__ = ["fold", "merge", "switch", "unmerge"]


def merge(layer: LoraModule, slot: int) -> None:
    """Fold ``slot`` into the base weight. Idempotent; refuses non-finite updates."""
    if layer.merged == slot:
        return
    if layer.merged is not None:
        raise RuntimeError(
            f"{layer.module_name}: slot {layer.merged} is merged; unmerge or switch first"
        )
    layer._check_slot(slot)
    if slot in layer.under:
        raise RuntimeError(f"{layer.module_name}: slot {slot} runs on top of slot "
                           f"{layer.under[slot]}; merge their composition instead")
    if layer.specs[slot].dora and layer.specs[slot].rank:
        dora.merge(layer, slot)
    elif layer.specs[slot].rank:  # a slot empty in this layer changes nothing here
        lora_bias.check_base_bias(layer, slot)
        layer.fold(slot, 1.0)
        lora_bias.fold_bias(layer, slot, 1.0)
    layer.merged = slot


def unmerge(layer: LoraModule) -> None:
    """Take the merged slot back out of the base weight. No-op when none is merged."""
    k = layer.merged
    if k is None:
        return
    if layer.specs[k].dora and layer.specs[k].rank:
        dora.unmerge(layer)
    elif layer.specs[k].rank:
        layer.fold(k, -1.0)
        lora_bias.fold_bias(layer, k, -1.0)
    layer.merged = None


def fold(layer: LoraModule, slot: int, sign: float) -> None:
    """W += sign * s B A of ``slot`` (``ops.lora.merge_`` / ``unmerge_``), refused with
    ``NonFiniteError`` (W unchanged) when the update is not finite: ``LoraModule.fold``
    of a layer whose factors are one matrix pair."""
    a, b = layer.factors(slot)
    op = lora_ops.merge_ if sign > 0 else lora_ops.unmerge_
    what = f"{'merging' if sign > 0 else 'unmerging'} slot {slot}"
    with layer.refusing(what):
        _in_matrix(layer, lambda m: op(m, a, b, layer.specs[slot].scale))


def switch(layer: LoraModule, slot: int) -> None:
    """Replace the merged slot by ``slot`` in one addition: W += dW_new - dW_old
    (``ops.lora.switch_``: one matmul of rank r_new + r_old and one pass over W).

    The difference is always formed lower slot first, and added or subtracted, so
    switching X -> Y -> X adds and removes the same rounded tensor: drift is a random
    walk, not a bias per direction. DoRA, a LoRA bias, or a slot empty here on one side
    run as an unmerge and a merge.
    """
    old = layer.merged
    if old is None:
        merge(layer, slot)
        return
    if old == slot:
        return
    layer._check_slot(slot)
    specs = layer.specs
    if not specs[slot].rank and not specs[old].rank:  # neither touches this layer
        layer.merged = slot
        return
    if (not specs[slot].rank or not specs[old].rank or specs[slot].dora or specs[old].dora
            or layer.has_bias(slot) or layer.has_bias(old)):
        lora_bias.check_base_bias(layer, slot)
        unmerge(layer)
        merge(layer, slot)
        return
    pair = [(*layer.factors(k), specs[k].scale) for k in (old, slot)]
    with layer.refusing(f"switching to slot {slot}"):
        _in_matrix(layer, lambda m: lora_ops.switch_(m, pair[0], pair[1],
                                                     new_first=slot < old))
    layer.merged = slot


def _in_matrix(layer: LoraModule, write: Callable[[Tensor], None]) -> None:
    """Run an in-place op on the weight as an ``(out, in)`` matrix: a view of the weight,
    or, where the layout gives a copy (a conv weight that is not contiguous), the copy
    written back."""
    w = layer.weight
    m = layer.weight_matrix(w)
    write(m)
    if m.untyped_storage().data_ptr() != w.untyped_storage().data_ptr():
        w.copy_(layer.to_weight_layout(m))
