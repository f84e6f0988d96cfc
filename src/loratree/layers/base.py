"""What every LoRA layer shares: a frozen base module plus 1..S adapter slots.

A subclass says how its input splits into tokens and how one slot's branch is computed;
this class does slot bookkeeping, per-token dispatch through the shared ``SlotContext``,
and merge / unmerge / switch of one slot into the base weight.

Composition, not inheritance of the base: ``self.base`` is the original module, untouched
except while a slot is merged into its weight.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from loratree.errors import NonFiniteError, QuantizedBaseError
from loratree.layers import dora, lora_bias
from loratree.layers.context import SlotContext
from loratree.layers.layout import FeatureLayout
from loratree.layers.spec import SlotSpec
from loratree.ops import lora as lora_ops
from loratree.ops import slots as slot_ops
from loratree.ops.slots import Segments, keep, map_segments

__all__ = ["LoraModule", "SlotSpec"]


BATCHED_MAX_TOKENS = 64
"""At inference, a mixed batch runs all its slots' adapters in one batched matmul pair
(``ops.slots.grouped_add``) when its rows are sorted by slot with as many rows per slot (a
view, whatever the length), or when it has at most this many tokens (a decode step; its
tokens are gathered); otherwise (prefill, training) one matmul pair per slot, or per run of
rows, over that slot's tokens."""


class LoraModule(FeatureLayout, nn.Module):
    """Base of the LoRA wrappers. Subclasses define shapes, tokens and the branch."""

    def __init__(self, base: nn.Module, ctx: SlotContext, name: str = "") -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.ParameterList()
        self.lora_b = nn.ParameterList()
        self.lora_magnitude = nn.ParameterDict()
        """str(slot) -> DoRA magnitude ``(out,)``, for DoRA slots only."""
        self.lora_bias = nn.ParameterList()
        """Per slot, the bias of B ``(out,)`` when ``specs[slot].bias``, else ``(0,)``."""
        self.specs: list[SlotSpec] = []
        self.ctx = ctx
        self.module_name = name
        self.merged: int | None = None
        self.static_slots = False
        """Slot weights change only through ``set_slot`` (a serving ``SlotTable`` owns
        them): mixed inference then skips checking, each forward, that no slot's weights
        were edited in place (16 version counters a layer for 8 slots, a few percent of a
        decode step)."""
        self.under: dict[int, int] = {}
        """slot -> a frozen slot that runs under it whenever it runs (a tree node being
        trained on top of its parent path). Single-slot forwards only."""

    # -- subclass interface -------------------------------------------------------------
    def a_shape(self, rank: int) -> tuple[int, ...]:
        raise NotImplementedError

    def b_shape(self, rank: int) -> tuple[int, ...]:
        raise NotImplementedError

    bias_features: int | None = None
    """The length of a LoRA bias (the output features); None: the layer takes none."""

    def bias_shape(self, spec: SlotSpec) -> tuple[int, ...]:
        """``(out,)`` for a slot with a LoRA bias, ``(0,)`` otherwise."""
        if not spec.bias or not spec.rank:
            return (0,)
        if self.bias_features is None:
            raise ValueError(f"{self.module_name}: a {type(self).__name__} takes no LoRA bias "
                             "(lora_bias is for linear layers)")
        return (self.bias_features,)

    def has_bias(self, slot: int) -> bool:
        """Whether ``slot`` adds a LoRA bias in this layer."""
        return self.specs[slot].bias and self.specs[slot].rank > 0

    def branch(self, x: Tensor, slot: int) -> Tensor:
        """The LoRA output of ``slot`` for input ``x`` (any leading shape the layer takes)."""
        raise NotImplementedError

    def tokens(self, x: Tensor) -> tuple[int, Tensor]:
        """(rows, x as a stack of independent tokens along dim 0)."""
        return x.shape[0], x

    def add_branch(self, y: Tensor, x: Tensor, slot: int) -> Tensor:
        """``y + branch(x, slot)``; a subclass may fuse the addition."""
        return y + self.branch(x, slot).to(y.dtype)

    # -- slots --------------------------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        """The base's float weight; a quantized base has none to write into."""
        w = getattr(self.base, "weight", None)
        if not isinstance(w, Tensor):
            raise QuantizedBaseError(
                f"{self.module_name}: the base is {type(self.base).__name__}, which keeps no "
                "float weight to merge into; export a merged model instead "
                "(loratree.surgery.export_merged, or `loratree merge --to float|nf4`)"
            )
        return w

    def factor_like(self) -> tuple[torch.dtype, torch.device]:
        """dtype and device for new LoRA factors: the base weight's (NF4: its float type)."""
        w = getattr(self.base, "weight", None)
        if isinstance(w, Tensor):
            return w.dtype, w.device
        return self.base.dtype, self.base.device

    @property
    def n_slots(self) -> int:
        return len(self.specs)

    def add_slot(self, spec: SlotSpec, init: str = "kaiming") -> int:
        """Append a fresh slot (B = 0, so it is an exact no-op) and return its index."""
        dtype, device = self.factor_like()
        a = torch.empty(self.a_shape(spec.rank), dtype=dtype, device=device)
        if spec.rank:
            self.init_a(a, spec.rank, init)
        b = torch.zeros(self.b_shape(spec.rank), dtype=dtype, device=device)
        if spec.dora and spec.rank:
            dora.check(self)
            self.lora_magnitude[str(len(self.specs))] = dora.new_magnitude(
                self, spec.rank, spec.scale)
        bias = torch.zeros(self.bias_shape(spec), dtype=dtype, device=device)
        self.lora_a.append(nn.Parameter(a))
        self.lora_b.append(nn.Parameter(b))
        self.lora_bias.append(nn.Parameter(bias))
        self.specs.append(spec)
        self._drop_caches()
        return len(self.specs) - 1

    dora_ok = False
    """Whether DoRA slots are implemented (``LoraLinear``, ``LoraConv``)."""

    def _drop_caches(self, slot: int | None = None) -> None:
        self.__dict__.pop("_live", None)
        self.__dict__.pop("_dora_live", None)
        if slot is not None:
            self.__dict__.get("_dora_norms", {}).pop(slot, None)

    def dora_slots(self) -> frozenset[int]:
        """The DoRA slots that touch this layer; cached until a slot changes."""
        found = self.__dict__.get("_dora_live")
        if found is None:
            found = frozenset(i for i, s in enumerate(self.specs) if s.dora and s.rank > 0)
            self.__dict__["_dora_live"] = found
        return found
    def init_a(self, a: Tensor, rank: int, init: str) -> None:
        """Fill a fresh A in place: N(0, 1/r) ("gaussian") or kaiming-uniform over its
        ``(rows, fan_in)`` matrix; a subclass whose A is not that matrix reshapes it."""
        if init == "gaussian":
            nn.init.normal_(a, std=1.0 / rank)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    @torch.no_grad()
    def load_slot(self, slot: int, a: Tensor, b: Tensor, magnitude: Tensor | None = None,
                  bias: Tensor | None = None) -> None:
        """Copy weights into a slot; shapes must match the slot's rank. A DoRA slot also
        takes its magnitude, a slot with a LoRA bias its bias."""
        pairs = [("A", a, self.lora_a[slot]), ("B", b, self.lora_b[slot])]
        if self.specs[slot].dora and self.specs[slot].rank:
            if magnitude is None:
                raise ValueError(f"{self.module_name}: DoRA slot {slot} needs its magnitude")
            pairs.append(("magnitude", dora.as_vector(self, magnitude),
                          self.lora_magnitude[str(slot)]))
        if bias is not None or self.has_bias(slot):
            pairs.append(("bias", bias if bias is not None else a.new_zeros(0),
                          self.lora_bias[slot]))
        self._drop_caches(slot)
        for name, src, dst in pairs:
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(
                    f"{self.module_name}: lora {name} of slot {slot} must be "
                    f"{tuple(dst.shape)}, got {tuple(src.shape)}"
                )
            dst.copy_(src)

    def set_slot(self, slot: int, spec: SlotSpec, a: Tensor | None = None,
                 b: Tensor | None = None, magnitude: Tensor | None = None,
                 bias: Tensor | None = None) -> None:
        """Put another adapter in ``slot``: its spec and factors (shared, not copied, when
        dtype and device already match), and its LoRA bias when ``spec.bias``.

        ``spec.rank == 0`` empties the slot (the adapter skips this layer). A merged slot
        cannot be replaced: unmerge or switch first. This is the serving hot path (one call
        per layer per activation), so it swaps the parameters' tensors in place.
        """
        if self.merged == slot:
            raise RuntimeError(f"{self.module_name}: slot {slot} is merged; unmerge first")
        if not 0 <= slot < len(self.specs):
            raise IndexError(f"{self.module_name}: no slot {slot}")
        # ParameterList indexing costs microseconds; a switch runs this per layer
        key = str(slot)
        pa = self._modules["lora_a"]._parameters[key]
        pb = self._modules["lora_b"]._parameters[key]
        if spec.rank == 0:
            a, b = pa.new_empty(self.a_shape(0)), pb.new_empty(self.b_shape(0))
        elif a is None or b is None:
            raise ValueError(f"{self.module_name}: slot {slot} of rank {spec.rank} needs A and B")
        else:
            for name, t, want in (("A", a, self.a_shape(spec.rank)),
                                  ("B", b, self.b_shape(spec.rank))):
                if t.shape != want:
                    raise ValueError(f"{self.module_name}: lora {name} for slot {slot} must "
                                     f"be {tuple(want)}, got {tuple(t.shape)}")
            if a.dtype != pa.dtype or a.device != pa.device:
                a, b = a.to(pa), b.to(pb)
        dora.set_magnitude(self, slot, spec, magnitude)
        pa.data, pb.data = a, b
        if pa.requires_grad or pb.requires_grad:
            pa.requires_grad_(False)
            pb.requires_grad_(False)
        lora_bias.set_bias(self, slot, spec, bias)
        self.specs[slot] = spec
        self.__dict__.pop("_batched", None)
        kept = self.__dict__.get("_slot_factors", {})  # (slot, rank) -> padded factors
        for key in [key for key in kept if key[0] == slot]:
            del kept[key]
        self._drop_caches(slot)

    # -- forward ------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        ctx = self.ctx
        if ctx.index is None:
            slot = ctx.active
            if slot == self.merged:
                return y
            if self.merged is not None:
                y = self._take_out_merged(y, x)
            if slot < 0:
                return y
            self._check_slot(slot)
            if self.specs[slot].dora and self.specs[slot].rank:
                return dora.single(self, y, x, slot)
            return self._add_stack(y, x, slot)
        if self.merged is None and not self.under and not self.live_slots():
            return y  # no slot touches this layer (a serving table's q,v adapters in o_proj)
        return self._forward_per_token(y, x)

    def _forward_per_token(self, y: Tensor, x: Tensor) -> Tensor:
        """Tokens that each name their slot (``ctx.index``): serving and fused training."""
        if self.under:
            raise RuntimeError(f"{self.module_name}: a slot stacked on another runs alone, "
                               "not in a per-token mixed batch")
        if self.merged is not None:
            y = self._take_out_merged(y, x)
        rows, flat = self.tokens(x)
        found = self.dora_slots()
        if found:
            found = found.intersection(self.ctx.batch_slots())
            if found:
                return dora.per_token(self, y, x, rows, flat, found)
        return self._lora_per_token(y, x, rows, flat)

    def _take_out_merged(self, y: Tensor, x: Tensor) -> Tensor:
        """The base output from ``y`` computed with slot ``merged`` folded in."""
        if self.specs[self.merged].dora and self.specs[self.merged].rank:
            return dora.take_out_merged(self, y, x)
        return y - self.branch(x, self.merged).to(y.dtype)

    def _lora_per_token(self, y: Tensor, x: Tensor, rows: int, flat: Tensor) -> Tensor:
        """``y`` plus every token's plain LoRA branch, by the strategy the plan picks."""
        n = flat.shape[0]
        # how this layer runs the batch depends only on the batch and on which slots touch
        # the layer, so layers alike share one plan per forward (a decode step's per-layer
        # cost is mostly such bookkeeping)
        live_slots = self.live_slots()
        grad = torch.is_grad_enabled()
        plan = self.ctx.memo(("plan", live_slots, len(self.specs), self.batchable, rows, n,
                              grad, self.training),
                             lambda: self._plan(live_slots, rows, n, grad))
        kind = plan[0]
        if kind == "none":
            return y
        if kind == "one":
            return self.add_branch(y, x, plan[1])
        if kind == "batched":
            y = self.batched_add(y, flat, plan[1], plan[2])
        elif kind == "runs":
            y = self.runs_add(y, flat, plan[1], live_slots)
        elif kind == "trained":
            y = self.trained_add(y, flat, plan[1], plan[2])
        else:
            y = y + self.mixed(flat, plan[1]).reshape(y.shape).to(y.dtype)
        return lora_bias.add_biases(self, y, rows, n)

    def _plan(self, live_slots: frozenset[int], rows: int, n: int, grad: bool) -> tuple:
        """("none",) | ("one", slot) | ("trained", slots, layout) | ("batched", slots,
        layout) | ("runs", runs) | ("mixed", segments): how a layer whose live slots are
        ``live_slots`` adds the batch's branches (checked once per forward)."""
        batch = self.ctx.batch_slots()
        if batch[-1] >= len(self.specs):
            self._check_slot(batch[-1])
        if live_slots.isdisjoint(batch):  # no adapter of the batch touches this layer
            return ("none",)
        seg = self.ctx.segments(rows, n)
        if seg.uniform is not None:
            return ("one", seg.uniform) if seg.uniform >= 0 else ("none",)
        live = tuple(s for s in seg.slots if s in live_slots)
        if grad and self.batchable and not (
                self.training and any(self.specs[s].dropout for s in seg.slots)):
            layout = self.ctx.grouped_rows(rows, n, seg.slots)
            if layout is not None:  # fused training, rows sorted by job: a view
                return ("trained", seg.slots, layout)
        if not grad and self.batchable:  # inference: no per-slot gather
            layout = self.ctx.grouped_rows(rows, n, live)
            if layout is not None:  # rows sorted by slot, as many per slot: a view
                return ("batched", live, layout)
            if n <= BATCHED_MAX_TOKENS:
                tokens = self.ctx.token_slots(rows, n).tolist()
                return ("batched", live, slot_ops.grouped_layout(tokens, live, seg.order.device))
            runs = self.ctx.runs(rows, n)
            if runs is not None:
                return ("runs", runs)
        return ("mixed", seg if len(live) == len(seg.slots) else keep(seg, live))

    def live_slots(self) -> frozenset[int]:
        """The slots that touch this layer (rank > 0); cached until a slot changes."""
        live = self.__dict__.get("_live")
        if live is None:
            live = frozenset(i for i, s in enumerate(self.specs) if s.rank > 0)
            self.__dict__["_live"] = live
        return live

    def _add_stack(self, y: Tensor, x: Tensor, slot: int) -> Tensor:
        y = self.add_branch(y, x, slot)
        under = self.under.get(slot)
        if under is not None and self.specs[under].rank:
            if self.specs[under].dora:
                raise RuntimeError(f"{self.module_name}: no slot stacks on DoRA slot {under}")
            y = self.add_branch(y, x, under)
        return y

    batchable = False
    """Whether ``batched_add`` is implemented (LoRA on linear layers)."""

    def batched_add(self, y: Tensor, flat: Tensor, slots: tuple[int, ...],
                    layout: slot_ops.Grouped) -> Tensor:
        """Inference (a decode step, or rows sorted by slot): y plus every ``slots``
        adapter's branch for its own tokens (placed by ``layout``), in one batched matmul
        pair, written into ``y``."""
        raise NotImplementedError

    def trained_add(self, y: Tensor, flat: Tensor, slots: tuple[int, ...],
                    layout: slot_ops.Grouped) -> Tensor:
        """Training on rows sorted by slot, as many per slot (``layout`` a view): y plus
        every slot's branch for its own rows in one batched matmul pair, differentiable
        (a new tensor; no gather and no scatter through autograd)."""
        raise NotImplementedError

    def runs_add(self, y: Tensor, flat: Tensor, runs: tuple[tuple[int, int, int], ...],
                 live: frozenset[int]) -> Tensor:
        """Inference on runs of rows that share a slot (``SlotContext.runs``): each run's
        branch added into its own rows of ``y``, in place."""
        raise NotImplementedError

    def mixed(self, flat: Tensor, seg: Segments) -> Tensor:
        """LoRA outputs for tokens that use different slots, one matmul per slot."""
        for slot in seg.slots:
            self._check_slot(slot)
        return map_segments(flat, seg, lambda slot, xs: self.branch(xs, slot))

    def _check_slot(self, slot: int) -> None:
        if slot >= len(self.specs):
            raise ValueError(
                f"{self.module_name}: slot {slot} requested, the layer has {len(self.specs)}"
            )

    def _dropout(self, x: Tensor, slot: int) -> Tensor:
        p = self.specs[slot].dropout
        return nn.functional.dropout(x, p, training=True) if p > 0.0 and self.training else x

    # -- merge ----------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, slot: int) -> None:
        """Fold ``slot`` into the base weight. Idempotent; refuses non-finite updates."""
        if self.merged == slot:
            return
        if self.merged is not None:
            raise RuntimeError(
                f"{self.module_name}: slot {self.merged} is merged; unmerge or switch first"
            )
        self._check_slot(slot)
        if slot in self.under:
            raise RuntimeError(f"{self.module_name}: slot {slot} runs on top of slot "
                               f"{self.under[slot]}; merge their composition instead")
        if self.specs[slot].dora and self.specs[slot].rank:
            dora.merge(self, slot)
        elif self.specs[slot].rank:  # a slot empty in this layer changes nothing here
            lora_bias.check_base_bias(self, slot)
            self._add(self.delta_weight(slot), f"merging slot {slot}")
            lora_bias.fold_bias(self, slot, 1.0)
        self.merged = slot

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the merged slot back out of the base weight. No-op when none is merged."""
        if self.merged is None:
            return
        if self.specs[self.merged].dora and self.specs[self.merged].rank:
            dora.unmerge(self)
        elif self.specs[self.merged].rank:
            self._add(self.delta_weight(self.merged), f"unmerging slot {self.merged}",
                      sign=-1.0)
            lora_bias.fold_bias(self, self.merged, -1.0)
        self.merged = None

    @torch.no_grad()
    def switch(self, slot: int) -> None:
        """Replace the merged slot by ``slot`` in one addition: W += dW_new - dW_old.

        The difference is one product of concatenated factors (ops.compose's identity):
        s1 B1 A1 - s0 B0 A0 = [s1 B1 | -s0 B0] [A1; A0], so a switch costs one matmul of
        rank r1 + r0 and one pass over W. The difference is always formed in the same
        order (lower slot first) and added or subtracted, so switching X -> Y -> X adds and
        removes the same rounded tensor: drift is a random walk, not a bias per direction.
        """
        if self.merged is None:
            self.merge(slot)
            return
        if self.merged == slot:
            return
        self._check_slot(slot)
        new_rank, old_rank = self.specs[slot].rank, self.specs[self.merged].rank
        if not new_rank and not old_rank:  # neither touches this layer
            self.merged = slot
            return
        if (not new_rank or not old_rank or self.specs[slot].dora
                or self.specs[self.merged].dora or self.has_bias(slot)
                or self.has_bias(self.merged)):
            lora_bias.check_base_bias(self, slot)
            self.unmerge()  # one side only touches this layer, DoRA or a bias: one plain fold
            self.merge(slot)
            return
        lo, hi = sorted((slot, self.merged))
        (a_lo, b_lo), (a_hi, b_hi) = self.factors(lo), self.factors(hi)
        s_lo, s_hi = self.specs[lo].scale, self.specs[hi].scale
        a = torch.cat([a_lo, a_hi])  # (r_lo + r_hi, in)
        b = torch.cat([b_lo * s_lo, b_hi * -s_hi], dim=1)  # (out, r_lo + r_hi)
        diff = self.to_weight_layout(b @ a)  # dW_lo - dW_hi
        self._add(diff, f"switching to slot {slot}", sign=1.0 if slot == lo else -1.0)
        self.merged = slot

    def factors(self, slot: int) -> tuple[Tensor, Tensor]:
        """(A, B) of ``slot`` as fp32 matrices ``(r, in)``, ``(out, r)``."""
        a, b = self.lora_a[slot].float(), self.lora_b[slot].float()
        return a.flatten(1), b.flatten(1)

    def delta_weight(self, slot: int) -> Tensor:
        """``scale * B @ A`` of ``slot`` in the base weight's layout (fp32)."""
        a, b = self.factors(slot)
        return self.to_weight_layout(lora_ops.delta(a, b, self.specs[slot].scale))

    def check_finite(self, slot: int) -> None:
        """Raise ``NonFiniteError`` naming this layer if slot ``slot`` holds NaN or Inf."""
        parts = [("A", self.lora_a[slot]), ("B", self.lora_b[slot]),
                 ("bias", self.lora_bias[slot])]
        if str(slot) in self.lora_magnitude:
            parts.append(("magnitude", self.lora_magnitude[str(slot)]))
        for part, t in parts:
            if not torch.isfinite(t).all():
                raise NonFiniteError(
                    f"{self.module_name}: lora {part} of slot {slot} is not finite"
                )

    def _add(self, delta: Tensor, what: str, sign: float = 1.0) -> None:
        """W += sign * delta, in place; refused (W unchanged) if the update is not finite.

        One reduction checks it: a NaN or Inf anywhere makes the sum non-finite (so does a
        sum past 3e38, an update no model survives anyway).
        """
        if not torch.isfinite(delta.sum()):
            raise NonFiniteError(
                f"{self.module_name}: {what} gives non-finite weights; the layer is unchanged"
            )
        w = self.weight
        if w.dtype == delta.dtype:
            w.add_(delta, alpha=sign)
        else:  # low-precision weights: add in fp32, round once
            w.copy_(w.float().add_(delta, alpha=sign))

    def extra_repr(self) -> str:
        ranks = [s.rank for s in self.specs]
        return f"slots={len(self.specs)}, ranks={ranks}, merged={self.merged}"
