"""Growing an adapter's rank in place, without changing what the model computes.

``grow_slot`` multiplies the rank of one slot in every layer it touches: new rows of A are
drawn as ``LoraModule.add_slot`` draws a fresh (kaiming) A, new columns of B are zero, so the
update B @ A, and with it every logit, is unchanged at the moment of growth. The scale
s = alpha / r (or alpha / sqrt(r) with rsLoRA) is kept by growing alpha with the rank
(``ops.lora.grown_alpha``): the saved adapter then says r = R and alpha = alpha * R / r.

The parameters stay the same ``nn.Parameter`` objects (their ``.data`` is replaced), so an
optimizer keeps training them; its per-entry state (AdamW's ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``) is padded with zeros for the new entries and kept for the old ones,
and its step count is kept. (Adam's bias correction then treats the new entries' zero
moments as long-accumulated ones, so their first updates can reach (1 - beta1) /
sqrt(1 - beta2), about 3x the learning rate, where a fresh Adam's first update is 1x.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from loratree.errors import RankTooLargeError
from loratree.layers import LoraModule, SlotSpec
from loratree.ops import lora as lora_ops
from loratree.surgery.inject import lora_layers

__all__ = ["GrowReport", "grow_slot"]


@dataclass(frozen=True)
class GrowReport:
    """What ``grow_slot`` changed: the layers, and each one's rank before and after."""

    slot: int
    layers: tuple[str, ...]
    old_ranks: tuple[int, ...]
    new_ranks: tuple[int, ...]
    added_params: int
    """Trainable entries added over all layers."""

    @property
    def old_rank(self) -> int:
        return max(self.old_ranks, default=0)

    @property
    def new_rank(self) -> int:
        return max(self.new_ranks, default=0)

    def __str__(self) -> str:
        return (f"slot {self.slot}: rank {self.old_rank} -> {self.new_rank} in "
                f"{len(self.layers)} layers (+{self.added_params:,} parameters)")


@torch.no_grad()
def grow_slot(
    model: nn.Module,
    slot: int,
    factor: int = 2,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
    *,
    max_rank: int | None = None,
) -> GrowReport:
    """Multiply the rank of ``slot`` by ``factor`` in every LoRA layer it touches.

    Layers where the slot is empty (rank 0) are left alone. New A rows are
    kaiming-uniform (a = sqrt(5), from ``generator`` or torch's global RNG), new B columns
    zero; ``optimizer``'s state for the slot's parameters is padded with zeros.

    Raises ``RuntimeError`` if the slot is merged into a layer, ``RankTooLargeError`` if a
    new rank would pass ``max_rank``, ``ValueError`` for a bad ``factor`` or an empty slot;
    in each case nothing is changed.
    """
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be an int >= 1, got {factor!r}")
    layers = {n: m for n, m in lora_layers(model).items()
              if slot < m.n_slots and m.specs[slot].rank > 0}
    if not layers:
        raise ValueError(f"slot {slot} adapts no layer; nothing to grow")
    for name, layer in layers.items():
        if layer.merged == slot:
            raise RuntimeError(f"{name}: slot {slot} is merged; unmerge it before growing")
        new = layer.specs[slot].rank * factor
        if max_rank is not None and new > max_rank:
            raise RankTooLargeError(f"{name}: growing slot {slot} to rank {new} passes the "
                                    f"maximum rank {max_rank}")
    old, added = [], 0
    for layer in layers.values():
        old.append(layer.specs[slot].rank)
        added += _grow_layer(layer, slot, factor, optimizer, generator)
    return GrowReport(slot, tuple(layers), tuple(old),
                      tuple(m.specs[slot].rank for m in layers.values()), added)


def _grow_layer(layer: LoraModule, slot: int, factor: int,
                optimizer: torch.optim.Optimizer | None,
                generator: torch.Generator | None) -> int:
    """Grow one layer's slot in place; the number of entries added."""
    spec = layer.specs[slot]
    rank, new_rank = spec.rank, spec.rank * factor
    pa, pb = layer.lora_a[slot], layer.lora_b[slot]
    rows = _fresh_rows(pa, new_rank - rank, generator)
    before = pa.numel() + pb.numel()
    a, b = lora_ops.grow(pa.data, pb.data, rows)
    state = optimizer.state if optimizer is not None else {}
    grads = [p.grad for p in (pa, pb)]
    for p, new in ((pa, a), (pb, b)):
        _pad_state(state.get(p, {}), p.shape, new, p is pa)
    layer.grow_slot(slot, SlotSpec(new_rank, lora_ops.grown_alpha(spec.alpha, rank, new_rank,
                                                                  spec.rslora),
                                   spec.dropout, spec.rslora, dora=spec.dora,
                                   bias=spec.bias), a, b)
    for p, grad in zip((pa, pb), grads, strict=True):
        if grad is not None:
            p.grad = _padded(grad, p.shape, p is pa)
    return pa.numel() + pb.numel() - before


def _fresh_rows(a: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """``n`` new rows for A, drawn as ``LoraModule.add_slot`` draws A.

    kaiming's bound depends on fan_in (A's size past dim 0), the same for the new rows as
    for the whole matrix, so the new rows have the distribution of a fresh A's.
    """
    device = generator.device if generator is not None else a.device
    rows = torch.empty((n, *a.shape[1:]), dtype=a.dtype, device=device)
    nn.init.kaiming_uniform_(rows, a=math.sqrt(5), generator=generator)
    return rows.to(a.device)


def _pad_state(state: dict, shape: torch.Size, new: Tensor, is_a: bool) -> None:
    """Zero-pad, in ``state``, every tensor of the parameter's old shape (exp_avg, ...)."""
    for key, value in state.items():
        if isinstance(value, Tensor) and value.shape == shape:
            state[key] = _padded(value, new.shape, is_a)


def _padded(t: Tensor, shape: torch.Size, is_a: bool) -> Tensor:
    """``t`` with zeros appended along the rank dim (0 for A, 1 for B) up to ``shape``."""
    dim = 0 if is_a else 1
    extra = list(t.shape)
    extra[dim] = shape[dim] - t.shape[dim]
    return torch.cat([t, t.new_zeros(extra)], dim=dim)
