"""The model's active slots, filled from the RAM cache: activate, switch, merge, release.

A fixed number of slots is reserved on the model once (every target layer wrapped, every
slot empty). ``activate(name)`` puts a cached adapter in a slot by pointing the slot at the
cache's tensors (no copy on CPU; one copy to the model's device otherwise), so activating
an adapter already in RAM is a few pointer swaps per layer. A slot's adapter stays
``acquire``-d in the cache, so the cache never evicts what a slot uses. When every slot is
taken, the least recently used slot that no running request holds is reused.

Two ways to run what the slots hold:

- unmerged: rows pick slots through the slot context (many adapters in one batch);
- merged: one LoRA adapter folded into the weights (zero overhead), switched to another
  by W += dW_new - dW_old (``merge``). ``plan`` picks the mode for a batch.

Slot -1 is always the base model alone (PEFT's ``__base__``).
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass
from enum import StrEnum

from torch import nn

from loratree import surgery
from loratree.adapters.files import AdapterFile, check_against
from loratree.adapters.token_files import token_bytes
from loratree.errors import (
    AdapterInUseError,
    CopyTooLargeError,
    RankTooLargeError,
    ShapeMismatchError,
    TargetError,
)
from loratree.layers import SlotSpec
from loratree.surgery.targets import pattern_value
from loratree.tree.cache import AdapterCache, LoadedAdapter

__all__ = ["BASE", "Plan", "SlotTable"]

logger = logging.getLogger(__name__)

_EMPTY = SlotSpec(0, 1.0)
DEFAULT_MAX_COPY_BYTES = 256 << 20
"""The default budget for one adapter's full module copies in a slot (``modules_to_save``):
256 MiB, room for the LM head of a small model (SmolLM2-135M's 49152 x 576 in float32 is
113 MB), not for that of a 7B model (32000 x 4096 in float32 is 524 MB)."""
BASE = "__base__"
"""The name of "no adapter": the base model, slot -1."""


class StepMode(StrEnum):
    """How a decode step runs the adapters (the slot table's plan)."""

    MERGED = "merged"
    """One LoRA adapter folded into the weights."""
    UNMERGED = "unmerged"
    """Each row (or token) through its own slot."""


@dataclass(frozen=True)
class Plan:
    """How a batch runs: merged (one adapter folded in) or unmerged (per-row slots)."""

    mode: StepMode
    slots: tuple[int, ...]


@dataclass
class _Slot:
    index: int
    name: str | None = None
    users: int = 0
    last_used: int = 0
    layers: tuple[str, ...] = ()
    kind: str = ""
    version: str = ""
    held: bool = False
    """Whether the slot holds its adapter in the cache (released before a refill, so a
    cache with room for exactly the slots' adapters can still switch)."""


class SlotTable:
    """``n_slots`` adapter slots on ``model`` for adapters of at most ``max_rank`` (LoRA)
    or ``max_prefix`` virtual tokens (prefix).

    The table owns its model's slots: their weights change only through it (``set_slot``),
    never in place, so its layers keep them also stacked for the batched decode path
    (``LoraModule.stack_slots``: ``set_slot`` copies an adapter into its slot's row).

    An adapter with ``modules_to_save`` (full copies of e.g. ``lm_head``) costs its copies'
    bytes per slot on top of its LoRA factors, one with ``trainable_token_indices`` its
    ``n x dim`` rows (and n ids; a tied head costs nothing more); one whose copies and rows,
    in the model's dtype, come to more than ``max_copy_bytes`` is refused
    (``CopyTooLargeError``, naming the adapter and the bytes). The modules are wrapped
    (``FullCopy``, ``TokenRows``) the first time an adapter needs them.
    """

    def __init__(self, model: nn.Module, cache: AdapterCache, n_slots: int = 8,
                 max_rank: int = 64, max_prefix: int = 64,
                 targets: tuple[str, ...] = ("all-linear",),
                 max_copy_bytes: int = DEFAULT_MAX_COPY_BYTES,
                 parameters: tuple[str, ...] = ()) -> None:
        if n_slots < 1:
            raise ValueError(f"n_slots must be >= 1, got {n_slots}")
        self.model, self.cache = model, cache
        self.max_rank, self.max_prefix = max_rank, max_prefix
        self.max_copy_bytes = max_copy_bytes
        indices = surgery.reserve_slots(model, n_slots, targets, parameters=parameters)
        self.layers = surgery.lora_layers(model)
        for layer in self.layers.values():
            layer.stack_slots()
        self.ctx = surgery.context(model)
        self._slots = [_Slot(i) for i in indices]
        self._by_name: dict[str, _Slot] = {}
        self._clock = itertools.count(1)
        self._lock = threading.RLock()
        self.merged_index: int | None = None
        """The slot folded into the weights, if any."""
        self._fits: dict[tuple[str, str], list] = {}
        """(name, version) of LoRA adapters already checked against the model -> their
        install plan: (module, layer, spec) per module."""

    # -- activation ------------------------------------------------------------------------
    def activate(self, name: str) -> int:
        """The slot holding ``name``, filling one first if needed (-1 for ``__base__``)."""
        if name == BASE:
            return -1
        with self._lock:
            slot = self._by_name.get(name)
            if slot is not None and slot.version == self.cache.version_of(name):
                slot.last_used = next(self._clock)
                return slot.index
            target = slot if slot is not None and slot.users == 0 else self._free_slot()
            if target.index == self.merged_index:
                self.unmerge()
            self._let_go(target)
            try:
                adapter = self.cache.acquire(name)  # held while in a slot: never evicted
            except BaseException:
                self._clear(target)
                raise
            try:
                self._check_size(adapter)
                keep = set(adapter.lora.weights) if adapter.lora is not None else set()
                self._clear(target, overwritten=keep)
                self._fill(target, adapter)
            except BaseException:
                self.cache.release(name)
                self._clear(target)
                self._wipe(target.index)  # a fill that failed halfway leaves no trace
                raise
            target.held = True
            target.last_used = next(self._clock)
            return target.index

    def check(self, adapter: LoadedAdapter) -> None:
        """Raise the error ``activate`` would raise for ``adapter`` (its rank or size
        against the slots, a LoRA adapter's modules and shapes against the model, a prefix
        adapter's geometry), touching no slot: the check before an adapter is served."""
        with self._lock:
            self._check_size(adapter)
            if adapter.prefix is not None:
                got = (adapter.prefix.n_layers, adapter.prefix.n_heads,
                       adapter.prefix.token_dim)
                geo = surgery.geometry(self.model)
                if got != (geo.n_layers, geo.n_heads, geo.token_dim):
                    raise ShapeMismatchError(
                        f"{adapter.name!r}: prefix for (layers, kv heads, token_dim) {got}, "
                        f"the model has {(geo.n_layers, geo.n_heads, geo.token_dim)}")
            elif adapter.lora is not None:
                self._fit(adapter)

    def acquire(self, name: str) -> int:
        """Activate ``name`` and hold its slot for a running request until ``release``."""
        with self._lock:
            index = self.activate(name)
            if index >= 0:
                self._slot(index).users += 1
            return index

    def release(self, index: int) -> None:
        if index < 0:
            return
        with self._lock:
            slot = self._slot(index)
            if slot.users == 0:
                raise RuntimeError(f"slot {index} is not held")
            slot.users -= 1

    def deactivate(self, name: str) -> bool:
        """Empty the slot holding ``name`` (releasing it in the cache); False if it is not
        active. Refused while a running request uses it."""
        with self._lock:
            slot = self._by_name.get(name)
            if slot is None:
                return False
            if slot.users:
                raise AdapterInUseError(f"{name!r} serves {slot.users} running request(s)")
            if slot.index == self.merged_index:
                self.unmerge()
            self._clear(slot)
            return True

    def slot_of(self, name: str) -> int | None:
        """The slot ``name`` is active in, or None."""
        if name == BASE:
            return -1
        slot = self._by_name.get(name)
        return slot.index if slot is not None else None

    def kind_of(self, index: int) -> str:
        """What slot ``index`` holds: "lora" or "prefix" ("base" for -1)."""
        if index < 0:
            return "base"
        with self._lock:
            return self._slot(index).kind

    def active(self) -> dict[str, int]:
        return {s.name: s.index for s in self._slots if s.name is not None}

    # -- merged mode -----------------------------------------------------------------------
    @property
    def merged(self) -> str | None:
        """The name of the adapter folded into the weights, if any."""
        if self.merged_index is None:
            return None
        return self._slot(self.merged_index).name

    def merge(self, name: str) -> int:
        """Fold ``name`` into the weights (switching from the merged one, if any)."""
        with self._lock:
            index = self.activate(name)
            self.merge_slot(index)
            return index

    def merge_slot(self, index: int) -> None:
        """Fold the adapter in slot ``index`` into the weights (-1: none merged)."""
        with self._lock:
            if index == self.merged_index:
                return
            if index < 0:
                self.unmerge()
                return
            slot = self._slot(index)
            if slot.kind != "lora":
                raise ValueError(f"slot {index} holds {slot.name!r}, a {slot.kind or 'empty'} "
                                 "slot; only LoRA adapters can be merged")
            surgery.switch(self.model, index)
            self.merged_index = index

    def unmerge(self) -> None:
        with self._lock:
            surgery.unmerge(self.model)
            self.merged_index = None

    def plan(self, names: list[str], merge_min_tokens: int = 16,
             new_tokens: int = 0) -> Plan:
        """Activate every name of a batch and choose how to run it (``plan_slots``)."""
        return self.plan_slots([self.activate(n) for n in names], merge_min_tokens,
                               new_tokens)

    def plan_slots(self, slots: list[int], merge_min_tokens: int = 16,
                   new_tokens: int = 0) -> Plan:
        """Choose how a batch whose rows hold ``slots`` runs.

        Merged when every row uses one LoRA slot and it is merged already, or the batch
        will run for at least ``merge_min_tokens`` new tokens (enough decode steps to repay
        the switch); otherwise unmerged, with per-row slots (the merged adapter, if any, is
        subtracted for rows that do not use it). Rows keep the slots they hold: an adapter
        replaced in the store meanwhile never changes a running row.
        """
        with self._lock:
            only = slots[0] if len(set(slots)) == 1 else -1
            if only >= 0 and self._slot(only).kind == "lora" and (
                    self.merged_index == only or new_tokens >= merge_min_tokens):
                self.merge_slot(only)
                return Plan(StepMode.MERGED, tuple(slots))
            return Plan(StepMode.UNMERGED, tuple(slots))

    # -- internals -------------------------------------------------------------------------
    def _slot(self, index: int) -> _Slot:
        for s in self._slots:
            if s.index == index:
                return s
        raise ValueError(f"slot {index} is not in the table")

    def _check_size(self, adapter: LoadedAdapter) -> None:
        if adapter.kind == "lora" and adapter.rank > self.max_rank:
            raise RankTooLargeError(f"{adapter.name!r} has rank {adapter.rank}; the slots "
                                    f"take at most {self.max_rank}")
        lora = adapter.lora if adapter.kind == "lora" else None
        if lora is not None and (lora.copies or lora.tokens):
            need = self._copy_bytes(lora.copies, lora.tokens)
            if need > self.max_copy_bytes:
                what = ([f"modules_to_save copies ({', '.join(lora.copies)})"] * bool(
                    lora.copies) + [f"trainable token rows ({', '.join(lora.tokens)})"] * bool(
                    lora.tokens))
                raise CopyTooLargeError(
                    f"{adapter.name!r}: its {' and '.join(what)} take {need:,} bytes per "
                    f"slot; the slot table holds at most {self.max_copy_bytes:,} "
                    "(max_copy_bytes)")
        if adapter.kind == "prefix" and adapter.rank > self.max_prefix:
            raise RankTooLargeError(f"{adapter.name!r} has {adapter.rank} virtual tokens; "
                                    f"the slots take at most {self.max_prefix}")

    def _copy_bytes(self, copies: dict, tokens: dict) -> int:
        """Bytes the copies and token rows (with their ids) take on the model: its dtype
        (that of its first parameter)."""
        size = next(self.model.parameters()).element_size()
        return (sum(t.numel() * size for parts in copies.values() for t in parts.values())
                + token_bytes(tokens, size))

    def _free_slot(self) -> _Slot:
        free = [s for s in self._slots if s.name is None]
        if free:
            return free[0]
        idle = [s for s in self._slots if s.users == 0]
        if not idle:
            raise AdapterInUseError(f"all {len(self._slots)} slots serve running requests")
        return min(idle, key=lambda s: (s.index == self.merged_index, s.last_used))

    def _wipe(self, index: int) -> None:
        for layer in self.layers.values():
            if layer.specs[index].rank:
                layer.set_slot(index, _EMPTY)
        for copy in self._copies():
            copy.drop(index)
        surgery.clear_prefix(self.model, index)

    def _copies(self) -> list:
        """The full copies and token rows on the model (what a slot holds beyond LoRA)."""
        return [*surgery.copy_layers(self.model).values(),
                *surgery.token_layers(self.model, tied=False).values()]

    def _let_go(self, slot: _Slot) -> None:
        """Release the slot's hold on its adapter in the cache, keeping its weights."""
        if slot.held and slot.name is not None:
            self.cache.release(slot.name)
        slot.held = False

    def _clear(self, slot: _Slot, overwritten: set[str] = frozenset()) -> None:
        """Empty the slot, except layers the next adapter overwrites anyway."""
        if slot.name is None:
            return
        empty = _EMPTY
        for name in slot.layers:
            if name not in overwritten:
                self.layers[name].set_slot(slot.index, empty)
        for copy in self._copies():
            copy.drop(slot.index)
        surgery.clear_prefix(self.model, slot.index)
        if self._by_name.get(slot.name) is slot:
            del self._by_name[slot.name]
        self._let_go(slot)
        slot.name, slot.layers, slot.kind, slot.version = None, (), "", ""

    def _fit(self, adapter: LoadedAdapter) -> tuple[list, AdapterFile]:
        """The install plan of a LoRA adapter, (module, layer, spec) per module, and the
        adapter matched to the model (``files.bind``: a ``target_parameters`` file's
        tensors, which the cache holds as stored, in our layout)."""
        assert adapter.lora is not None
        if not adapter.lora.pending:
            self._check_wrapped(adapter, adapter.lora)
        lora = check_against(self.model, adapter.lora, adapter.name)
        self._check_wrapped(adapter, lora)
        config = lora.config
        plan = [(module, self.layers[module], SlotSpec(
            a.shape[0], float(pattern_value(config.alpha_pattern, module, config.alpha)),
            0.0, config.use_rslora, dora=config.use_dora, bias=module in lora.biases))
            for module, (a, _) in lora.weights.items()]
        return plan, lora

    def _check_wrapped(self, adapter: LoadedAdapter, lora: AdapterFile) -> None:
        missing = sorted(set(lora.weights) - set(self.layers))
        if missing:
            raise TargetError(f"{adapter.name!r} adapts {missing[:3]}, which the slot "
                              "table does not wrap; widen its targets")

    def _fill(self, slot: _Slot, adapter: LoadedAdapter) -> None:
        if adapter.kind == "prefix":
            assert adapter.prefix is not None
            surgery.set_prefix(self.model, slot.index, adapter.prefix.vectors,
                               adapter.prefix.positions)
            slot.layers = ()
        else:
            assert adapter.lora is not None
            key = (adapter.name, adapter.version)
            fit = self._fits.get(key)
            if fit is None:  # checked, and its per-layer specs made, once per version
                fit = self._fit(adapter)
                if len(self._fits) >= 4096:
                    self._fits.clear()
                self._fits[key] = fit
            plan, lora = fit
            weights = lora.weights  # adapted parameters: their tensors matched to the model
            magnitudes, biases = lora.magnitudes, lora.biases  # DoRA's, lora_bias's, or empty
            for module, layer, spec in plan:
                layer.set_slot(slot.index, spec, *weights[module], magnitudes.get(module),
                               biases.get(module))
            for module, parts in lora.copies.items():
                surgery.wrap_copy(self.model, module, self.ctx).set_copy(
                    slot.index, parts["weight"], parts.get("bias"))
            for module, (ids, rows) in lora.tokens.items():
                surgery.wrap_tokens(self.model, module, self.ctx).set_rows(slot.index, ids, rows)
            slot.layers = tuple(weights)
        slot.name, slot.kind, slot.version = adapter.name, adapter.kind, adapter.version
        self._by_name[adapter.name] = slot
