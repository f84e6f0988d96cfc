"""What every LoRA layer shares: a frozen base module plus 1..S adapter slots.

A subclass says how its input splits into tokens and how one slot's branch is computed;
this class does slot bookkeeping, the forward ``y = W x + s[k] B[k] (A[k] x)`` (each
token's slot k from the shared ``SlotContext``, run by the plan ``ops.plan.choose_plan``
picks) and merge / unmerge / switch of one slot into the base weight (``ops.lora``).

Composition, not inheritance of the base: ``self.base`` is the original module, untouched
except while a slot is merged into its weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from loratree.errors import NonFiniteError, QuantizedBaseError
from loratree.layers import dora, lora_bias, merging
from loratree.layers.context import SlotContext
from loratree.layers.layout import FeatureLayout
from loratree.layers.spec import SlotSpec
from loratree.ops import lora as lora_ops
from loratree.ops import plan as plans
from loratree.ops import stack as stack_ops
from loratree.ops.add_lora import SlotFactors, Stacked
from loratree.ops.slots import map_segments

__all__ = ["LoraModule", "SlotSpec"]


@dataclass(frozen=True)
class _Derived:
    """What the forward reads of the slots, rebuilt after ``_invalidate``."""

    live: frozenset[int]
    """The slots of rank > 0."""
    dora: frozenset[int]
    """The DoRA slots of rank > 0."""
    factors: SlotFactors


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
        self.under: dict[int, int] = {}
        """slot -> a frozen slot that runs under it whenever it runs (a tree node being
        trained on top of its parent path). Single-slot forwards only."""
        self.register_buffer("a_stack", None, persistent=False)
        self.register_buffer("b_stack", None, persistent=False)
        """A serving table's stacked slots ``(S, R, in)``, ``(S, out, R)`` (``ops.stack``),
        set by ``stack_slots``; None otherwise."""
        self.dora_norms: dict[int, tuple] = {}
        """slot -> (what it was computed from, its DoRA norm) (``layers.dora.norm``)."""
        self.dora_merged_n: Tensor | None = None
        """The norm a merged DoRA slot was merged with (``layers.dora.merge``)."""
        self._derived: _Derived | None = None

    # -- subclass interface -------------------------------------------------------------
    def a_shape(self, rank: int) -> tuple[int, ...]:
        raise NotImplementedError

    def b_shape(self, rank: int) -> tuple[int, ...]:
        raise NotImplementedError

    bias_features: int | None = None
    """The length of a LoRA bias (the output features); None: the layer takes none."""

    batchable = False
    """Whether the slots' factors are matrices that ``ops.add_lora`` runs in batched
    matmuls (LoRA on linear layers); other layers run one ``branch`` per slot."""

    dora_ok = False
    """Whether DoRA slots are implemented (``LoraLinear``, ``LoraConv``)."""

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
        """``y + branch(x, slot)``."""
        return self.add_lora(y, x, self._uniform(slot))

    def add_lora(self, y: Tensor, x: Tensor, plan: plans.Plan) -> Tensor:
        """``y`` plus each token's branch as ``plan`` says: one ``branch`` per slot (a
        layer whose factors are matrices runs ``ops.add_lora`` instead)."""
        match plan:
            case plans.Uniform(slot=k):
                return y + self.branch(x, k).to(y.dtype)
            case plans.Segmented(seg=seg):
                for k in seg.slots:
                    self._check_slot(k)
                out = map_segments(self.tokens(x)[1], seg, lambda k, xs: self.branch(xs, k))
                return y + out.reshape(y.shape).to(y.dtype)
        return y

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
        self._invalidate(len(self.specs) - 1)
        return len(self.specs) - 1

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
        for name, src, dst in pairs:
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(
                    f"{self.module_name}: lora {name} of slot {slot} must be "
                    f"{tuple(dst.shape)}, got {tuple(src.shape)}"
                )
        for _, src, dst in pairs:
            dst.copy_(src)
        self._invalidate(slot)

    def set_slot(self, slot: int, spec: SlotSpec, a: Tensor | None = None,
                 b: Tensor | None = None, magnitude: Tensor | None = None,
                 bias: Tensor | None = None) -> None:
        """Put another adapter in ``slot``: its spec and factors (shared, not copied, when
        dtype and device already match; copied into row ``slot`` of the serving stacks),
        and its LoRA bias when ``spec.bias``.

        ``spec.rank == 0`` empties the slot (the adapter skips this layer). A merged slot
        cannot be replaced: unmerge or switch first.
        """
        if self.merged == slot:
            raise RuntimeError(f"{self.module_name}: slot {slot} is merged; unmerge first")
        if not 0 <= slot < len(self.specs):
            raise IndexError(f"{self.module_name}: no slot {slot}")
        pa, pb = self.lora_a[slot], self.lora_b[slot]
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
            a, b = a.to(pa), b.to(pb)
        dora.set_magnitude(self, slot, spec, magnitude)
        lora_bias.set_bias(self, slot, spec, bias)
        self._replace(slot, spec, a, b, trainable=False)

    def grow_slot(self, slot: int, spec: SlotSpec, a: Tensor, b: Tensor) -> None:
        """Give ``slot`` a higher rank: ``spec`` and its factors, the same parameters
        (``surgery.grow_slot``: an optimizer keeps training them)."""
        self._replace(slot, spec, a, b, trainable=None)

    def _replace(self, slot: int, spec: SlotSpec, a: Tensor, b: Tensor,
                 trainable: bool | None) -> None:
        """Point slot ``slot``'s parameters at ``a`` and ``b`` under ``spec`` (trainable
        None: as they were)."""
        pa, pb = self.lora_a[slot], self.lora_b[slot]
        pa.data, pb.data = a, b
        if trainable is not None:
            pa.requires_grad_(trainable)
            pb.requires_grad_(trainable)
        self.specs[slot] = spec
        self._invalidate(slot)

    def stack_slots(self) -> None:
        """Keep the slots also stacked for serving (``ops.stack``; a ``SlotTable`` owns the
        layer): the batched inference path then reads views of the stacks. Slot weights
        must then change only through this class (``set_slot``, ``load_slot``,
        ``grow_slot``): an edit in place of a slot's parameters does not reach the
        stacks. A layer without the batched path keeps none."""
        if not self.batchable or self.a_stack is not None:
            return
        n_in, n_out = self.a_shape(0)[1], self.b_shape(0)[0]
        dtype, device = self.factor_like()
        self.a_stack = torch.zeros((0, 0, n_in), dtype=dtype, device=device)
        self.b_stack = torch.zeros((0, n_out, 0), dtype=dtype, device=device)
        for slot in range(len(self.specs)):
            self._invalidate(slot)

    def _invalidate(self, slot: int | None = None) -> None:
        """Slot ``slot`` (None: any) changed: drop what is derived from the slots and
        rewrite the slot's row of the serving stacks. The one way a change reaches the
        forward; every method that changes a slot calls it."""
        self._derived = None
        if slot is None:
            self.dora_norms.clear()
            return
        self.dora_norms.pop(slot, None)
        if self.a_stack is not None:
            spec = self.specs[slot]
            self.a_stack, self.b_stack = stack_ops.stack_grown(
                self.a_stack, self.b_stack, len(self.specs), spec.rank)
            stack_ops.stack_put_(self.a_stack, self.b_stack, slot, self.lora_a[slot].detach(),
                                 self.lora_b[slot].detach(), spec.scale)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> LoraModule:
        """``.to()``, ``.half()``...: the stacks are new tensors (buffers are replaced,
        not converted in place), so what was derived from them goes too."""
        out = super()._apply(fn, recurse)
        self._invalidate()
        return out

    def derived(self) -> _Derived:
        """The live slots and the factor view the forward reads (cached until a slot
        changes)."""
        found = self._derived
        if found is None:
            found = self._derived = self._derive()
        return found

    def _derive(self) -> _Derived:
        specs = self.specs
        live = frozenset(i for i, s in enumerate(specs) if s.rank > 0)
        stacked = None
        if self.a_stack is not None:
            stacked = Stacked(self.a_stack, self.b_stack, max((s.rank for s in specs), default=0))
        factors = SlotFactors(
            list(self.lora_a), list(self.lora_b), [s.scale for s in specs],
            [s.dropout for s in specs],
            [self.lora_bias[k] if self.has_bias(k) else None for k in range(len(specs))],
            stacked)
        return _Derived(live, frozenset(k for k in live if specs[k].dora), factors)

    def live_slots(self) -> frozenset[int]:
        """The slots that touch this layer (rank > 0)."""
        return self.derived().live

    def dora_slots(self) -> frozenset[int]:
        """The DoRA slots that touch this layer."""
        return self.derived().dora

    # -- forward ------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """``y = W x + s[k] B[k] (A[k] x)`` for each token's slot k (``ctx``), as the plan
        says (``ops.plan``); a merged slot is in W already and taken out for the others."""
        y = self.base(x)
        if self.ctx.index is None and self.ctx.active == self.merged:
            return y  # W is what was asked: the merged slot, or the base with none merged
        if self.merged is not None:
            y = self._take_out_merged(y, x)
        plan = self.plan(x)
        found = self._dora_in(plan)
        if found:
            return dora.add_lora(self, y, x, plan, found)
        return self.add_planned(y, x, plan)

    def add_planned(self, y: Tensor, x: Tensor, plan: plans.Plan) -> Tensor:
        """``y`` plus the plain LoRA branches ``plan`` covers, and their LoRA biases."""
        y = self.add_lora(y, x, plan)
        match plan:
            case plans.Uniform(slot=k) if k in self.under:
                return self._add_under(y, x, self.under[k])
            case plans.Grouped() | plans.GroupedRows() | plans.Runs() | plans.Segmented():
                return lora_bias.add_biases(self, y, x)
        return y

    def plan(self, x: Tensor) -> plans.Plan:
        """How this forward adds its branches; the context records it (``last_plan``)."""
        ctx = self.ctx
        if ctx.index is None:
            if ctx.active < 0:
                plan: plans.Plan = plans.NO_BRANCH
            else:
                self._check_slot(ctx.active)
                plan = self._uniform(ctx.active)
        else:
            plan = self._per_token_plan(x)
        ctx.last_plan = plan
        return plan

    def _uniform(self, slot: int) -> plans.Uniform:
        """Every token on ``slot``, its dropout applied in training."""
        return plans.Uniform(slot, self.training and self.specs[slot].dropout > 0)

    def _per_token_plan(self, x: Tensor) -> plans.Plan:
        """Tokens that each name their slot (``ctx.index``): serving and fused training.
        Layers alike share one plan per forward (``SlotContext.memo``): it depends only
        on the batch and on which slots touch the layer."""
        if self.under:
            raise RuntimeError(f"{self.module_name}: a slot stacked on another runs alone, "
                               "not in a per-token mixed batch")
        live = self.live_slots()
        if not live:
            return plans.NO_BRANCH  # no slot touches this layer (q,v adapters in o_proj)
        rows, flat = self.tokens(x)
        n = flat.shape[0]
        batch = self.ctx.batch(rows, n)
        if batch.slots[-1] >= len(self.specs):
            self._check_slot(batch.slots[-1])
        grad = torch.is_grad_enabled()
        dropout = self.training and any(self.specs[k].dropout for k in batch.slots if k >= 0)
        return self.ctx.memo(
            ("plan", live, self.batchable, rows, n, grad, dropout),
            lambda: plans.choose_plan(batch, live, grad=grad, dropout=dropout,
                                      grouped=self.batchable))

    def _dora_in(self, plan: plans.Plan) -> frozenset[int]:
        """The DoRA slots whose tokens ``plan`` runs."""
        found = self.dora_slots()
        if not found:
            return found
        match plan:
            case plans.NoBranch():
                return frozenset()
            case plans.Uniform(slot=k):
                return found.intersection((k,))
        return found.intersection(self.ctx.batch_slots())

    def _take_out_merged(self, y: Tensor, x: Tensor) -> Tensor:
        """The base output from ``y`` computed with slot ``merged`` folded in."""
        if self.specs[self.merged].dora and self.specs[self.merged].rank:
            return dora.take_out_merged(self, y, x)
        return y - self.branch(x, self.merged).to(y.dtype)

    def _add_under(self, y: Tensor, x: Tensor, under: int) -> Tensor:
        """``y`` plus the branch of the frozen slot ``under`` that runs under the slot."""
        if not self.specs[under].rank:
            return y
        if self.specs[under].dora:
            raise RuntimeError(f"{self.module_name}: no slot stacks on DoRA slot {under}")
        return self.add_branch(y, x, under)

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
        merging.merge(self, slot)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the merged slot back out of the base weight. No-op when none is merged."""
        merging.unmerge(self)

    @torch.no_grad()
    def switch(self, slot: int) -> None:
        """Replace the merged slot by ``slot`` in one addition: W += dW_new - dW_old."""
        merging.switch(self, slot)

    def fold(self, slot: int, sign: float) -> None:
        """W += sign * s B A of ``slot`` (a merge or an unmerge, no DoRA)."""
        merging.fold(self, slot, sign)

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

    @contextmanager
    def refusing(self, what: str) -> Iterator[None]:
        """Turn an ``ops.lora`` refusal of a non-finite update into a ``NonFiniteError``
        that names this layer and what was being done."""
        try:
            yield
        except FloatingPointError:
            raise NonFiniteError(f"{self.module_name}: {what} gives non-finite weights; the "
                                 "layer is unchanged") from None

    def extra_repr(self) -> str:
        ranks = [s.rank for s in self.specs]
        return f"slots={len(self.specs)}, ranks={ranks}, merged={self.merged}"
