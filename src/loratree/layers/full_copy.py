"""Full per-slot copies of a module: PEFT's ``modules_to_save`` (an ``lm_head``, a
classifier head, an embedding), beside the LoRA slots.

A slot that holds a copy runs its tokens through its own weight (and bias) instead of the
base's; every other slot, and slot -1, runs the base. In a mixed batch each token's output
comes from its own slot's copy or the base. Memory: a copy costs the module's parameter
bytes per slot (``nbytes``), where a LoRA slot costs ``r * (in + out)`` values per layer.

Merging a slot puts its copy in place of the base weight (the base's own tensors are kept
aside, so unmerging restores them exactly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loratree.errors import NonFiniteError
from loratree.layers.context import SlotContext

__all__ = ["FullCopy"]


class FullCopy(nn.Module):
    """``base`` (a Linear-like module with ``weight`` ``(out, in)`` or an ``nn.Embedding``)
    with a full copy of its weight and bias for some slots."""

    def __init__(self, base: nn.Module, ctx: SlotContext, name: str = "") -> None:
        super().__init__()
        if not isinstance(getattr(base, "weight", None), Tensor) or base.weight.dim() != 2:
            raise TypeError(f"{name}: modules_to_save takes a Linear or an Embedding, "
                            f"not a {type(base).__name__}")
        self.base, self.ctx, self.module_name = base, ctx, name
        self.embedding = isinstance(base, nn.Embedding)
        self.copy_weight = nn.ParameterDict()
        self.copy_bias = nn.ParameterDict()
        self.merged: int | None = None
        self._original: tuple[Tensor, Tensor | None] | None = None
        """The base's own weight and bias while a slot's copy is merged in their place."""

    # -- slots ----------------------------------------------------------------------------
    def slots(self) -> tuple[int, ...]:
        return tuple(sorted(int(k) for k in self.copy_weight))

    def has(self, slot: int) -> bool:
        return str(slot) in self.copy_weight

    def original(self) -> tuple[Tensor, Tensor | None]:
        """The base's own (weight, bias), whatever is merged."""
        if self._original is not None:
            return self._original
        return self.base.weight, getattr(self.base, "bias", None)

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        """The shapes a copy's weight and bias must have (bias None: the base has none)."""
        w, b = self.original()
        return tuple(w.shape), None if b is None else tuple(b.shape)

    def add_copy(self, slot: int, weight: Tensor | None = None, bias: Tensor | None = None,
                 *, trainable: bool = True) -> None:
        """Give ``slot`` its own copy: of ``weight`` / ``bias`` when given (copied), else
        of the base's own tensors (a fresh copy is an exact no-op)."""
        w0, b0 = self.original()
        self._check(slot, weight if weight is not None else w0,
                    bias if bias is not None else b0)
        w = (weight if weight is not None else w0).detach().to(w0).clone()
        self.copy_weight[str(slot)] = nn.Parameter(w, requires_grad=trainable)
        if b0 is not None:
            b = (bias if bias is not None else b0).detach().to(b0).clone()
            self.copy_bias[str(slot)] = nn.Parameter(b, requires_grad=trainable)

    def set_copy(self, slot: int, weight: Tensor, bias: Tensor | None = None) -> None:
        """Point ``slot`` at ``weight`` / ``bias`` (shared, not copied, when dtype and
        device match): the serving hot path, frozen."""
        if self.merged == slot:
            raise RuntimeError(f"{self.module_name}: slot {slot} is merged; unmerge first")
        w0, b0 = self.original()
        self._check(slot, weight, bias)
        self.copy_weight[str(slot)] = nn.Parameter(weight.to(w0), requires_grad=False)
        if b0 is not None:
            self.copy_bias[str(slot)] = nn.Parameter(bias.to(b0), requires_grad=False)

    def drop(self, slot: int) -> None:
        """``slot`` runs the base again."""
        if self.merged == slot:
            raise RuntimeError(f"{self.module_name}: slot {slot} is merged; unmerge first")
        self.copy_weight.pop(str(slot), None)
        self.copy_bias.pop(str(slot), None)

    def nbytes(self, slot: int | None = None) -> int:
        """Bytes one slot's copy costs (``slot`` None: what a copy of this module costs)."""
        w, b = self.original()
        if slot is not None and self.has(slot):
            w, b = self.copy_weight[str(slot)], self.copy_bias.get(str(slot))
        return w.numel() * w.element_size() + (0 if b is None else b.numel() * b.element_size())

    def parameters_of(self, slot: int) -> list[nn.Parameter]:
        if not self.has(slot):
            return []
        key = str(slot)
        return [self.copy_weight[key]] + ([self.copy_bias[key]] if key in self.copy_bias else [])

    def _check(self, slot: int, weight: Tensor, bias: Tensor | None) -> None:
        want_w, want_b = self.shapes()
        if tuple(weight.shape) != want_w:
            raise ValueError(f"{self.module_name}: the copy's weight for slot {slot} must be "
                             f"{want_w}, got {tuple(weight.shape)}")
        got_b = None if bias is None else tuple(bias.shape)
        if got_b != want_b:
            raise ValueError(f"{self.module_name}: the copy's bias for slot {slot} must be "
                             f"{want_b}, got {got_b}")

    # -- forward --------------------------------------------------------------------------
    def weights_of(self, slot: int) -> tuple[Tensor, Tensor | None]:
        """The (weight, bias) that ``slot``'s tokens use (-1: the base's own)."""
        key = str(slot)
        if key in self.copy_weight:
            return self.copy_weight[key], self.copy_bias.get(key)
        return self.original()

    def _differs(self, slot: int) -> bool:
        """Whether ``slot`` runs other weights than the base module holds now."""
        return slot != self.merged and (self.has(slot) or self.merged is not None)

    def run(self, x: Tensor, slot: int) -> Tensor:
        """The module's output for ``x`` with ``slot``'s weights."""
        w, b = self.weights_of(slot)
        if self.embedding:
            e = self.base
            return F.embedding(x, w, e.padding_idx, e.max_norm, e.norm_type,
                               e.scale_grad_by_freq, e.sparse)
        return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))

    def forward(self, x: Tensor) -> Tensor:
        ctx = self.ctx
        if ctx.index is None:
            return self.run(x, ctx.active) if self._differs(ctx.active) else self.base(x)
        y = self.base(x)
        slots = [k for k in ctx.batch_slots() if self._differs(k)]
        if self.merged is not None and -1 not in slots:
            slots.append(-1)  # slot -1's rows, if any, need the base's own weights back
        if not slots:
            return y
        n = x.numel() if self.embedding else x.numel() // x.shape[-1]
        flat_x = x.reshape(n) if self.embedding else x.reshape(n, x.shape[-1])
        out = y.reshape(n, y.shape[-1])
        tokens = ctx.head_slots(x.shape[0] if x.dim() > 1 else 1, n)
        for slot in slots:
            where = (tokens == slot).nonzero().squeeze(1)
            if where.numel():
                out = out.index_copy(0, where, self.run(flat_x[where], slot).to(out.dtype))
        return out.view(y.shape)

    # -- merge ----------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, slot: int) -> None:
        """Put ``slot``'s copy in place of the base's weight and bias (a slot with no copy
        keeps the base's own). Refuses a copy that is not finite."""
        if self.merged == slot:
            return
        if self.merged is not None:
            self.unmerge()
        if not self.has(slot):
            self.merged = slot
            return
        w, b = self.weights_of(slot)
        if not torch.isfinite(w).all() or (b is not None and not torch.isfinite(b).all()):
            raise NonFiniteError(f"{self.module_name}: the copy of slot {slot} is not finite; "
                                 "the layer is unchanged")
        w0, b0 = self.base.weight.data, None if b is None else self.base.bias.data
        self._original = (w0, b0)
        self.base.weight.data = w.detach().clone()
        if b is not None:
            self.base.bias.data = b.detach().clone()
        self.merged = slot

    @torch.no_grad()
    def unmerge(self) -> None:
        """Give the base its own weight and bias back (exactly)."""
        if self._original is not None:
            w0, b0 = self._original
            self.base.weight.data = w0
            if b0 is not None:
                self.base.bias.data = b0
            self._original = None
        self.merged = None

    def extra_repr(self) -> str:
        return f"copies={list(self.slots())}, merged={self.merged}"
