"""Who runs next: the waiting queue, the running rows, admission, retirement, and whether a
step runs merged or unmerged.

Pure bookkeeping: nothing here calls the model. The engine (``serve.engine``) asks the
scheduler what to do, has the runner (``serve.runner``) do the model's part, and hands the
resulting rows back. The slot table is reached only through ``SlotTableLike`` (acquire,
release, kind, plan, unmerge), so the policies can be tested with a fake table.

Rows stay sorted by slot: a decode step whose slots have as many rows each then lays its
rows out per slot as a view, with no gather (``ops.slots.grouped_layout``). Whenever the
rows change order or some leave, the scheduler returns the row indices to keep, in order,
and the engine applies them to the batch's cache, which is laid out row for row.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from loratree.errors import AdapterInUseError, CacheFullError
from loratree.serve.grouping import prefill_groups
from loratree.serve.health import Health
from loratree.serve.requests import Completion, FinishReason, Handle, Request, TokenLogprob
from loratree.serve.rows import Row
from loratree.serve.slot_table import StepMode

__all__ = ["PACK_TOKENS", "Admitted", "Batching", "Policy", "Scheduler", "SlotTableLike",
           "StepMode", "StepPlan"]

logger = logging.getLogger(__name__)

PACK_TOKENS = 512
"""Most prompt tokens a decode step prefills for joining requests; a longer prompt is
prefilled on its own (a packed step's mask is dense: tokens x cached entries)."""

PREFIX = "prefix"
"""``SlotTableLike.kind_of`` of a prefix adapter's slot: it enters the cache in its own
prefill, never in a packed step."""


class Batching(StrEnum):
    """When waiting requests may join."""

    CONTINUOUS = "continuous"
    """Whenever the batch has room."""
    STATIC = "static"
    """Only into an empty batch: the baseline continuous batching is measured against
    (benchmarks only; ``Engine.static_baseline``)."""


@dataclass(frozen=True)
class Admitted:
    """A request taken from the queue: its adapter resolved and its slot held."""

    handle: Handle
    ids: tuple[int, ...]
    """The prompt's token ids."""
    adapter: str
    slot: int
    others: tuple[Handle, ...] = ()
    """Choices 1 .. n-1 of the same request (``Request.n``): they share this prefill and
    hold the slot once more each."""

    @property
    def handles(self) -> tuple[Handle, ...]:
        """Every choice's handle, choice order."""
        return (self.handle, *self.others)

    @property
    def full_logits(self) -> bool:
        """Its prefill needs logits at every prompt position (prompt log-probabilities)."""
        return self.handle.request.prompt_logprobs is not None


@dataclass(frozen=True)
class Policy:
    """The admission and merge policy (``Engine``'s options of the same names)."""

    max_batch: int = 8
    packs: bool = True
    """Joining requests (other than prefix adapters') prefill inside a decode step."""
    join_wait: float = 2.0
    merge_min_tokens: int = 16
    batching: Batching = Batching.CONTINUOUS


@dataclass(frozen=True)
class StepPlan:
    """What the next decode step runs: each running row's slot, then each joiner's."""

    mode: StepMode
    slots: tuple[int, ...]
    uniform: int | None
    """The one slot every token goes through (the merged adapter's, or the slot all rows
    share: no per-row gather), or None: each row through its own slot."""


class _PlanLike(Protocol):
    mode: str
    slots: tuple[int, ...]


class SlotTableLike(Protocol):
    """What the scheduler needs of ``adapters.slot_table.SlotTable``."""

    merged_index: int | None

    def acquire(self, name: str) -> int: ...
    def release(self, index: int) -> None: ...
    def kind_of(self, index: int) -> str: ...
    def plan_slots(self, slots: list[int], merge_min_tokens: int = 16,
                   new_tokens: int = 0) -> _PlanLike: ...
    def unmerge(self) -> None: ...


Resolve = Callable[[Request], tuple[list[int], str]]
"""A request's prompt ids and adapter name (``auto`` routed); raises for a bad request."""


class Scheduler:
    """The queue and the running rows of one engine, and the decisions about them."""

    def __init__(self, table: SlotTableLike, tokenizer: object, resolve: Resolve,
                 policy: Policy, *, windowed: bool = False,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.table, self.tokenizer, self.resolve = table, tokenizer, resolve
        self.policy = policy
        self.windowed = windowed
        """Some layers attend over a sliding window: prefill groups split (``grouping``)."""
        self.clock = clock
        """The clock ``Handle.submitted`` was read on (``join_wait``)."""
        self.health = Health()
        self.rows: list[Row] = []
        self.joining: list[Admitted] = []
        """Admitted requests whose prompts the next decode step prefills."""
        self.modes: dict[StepMode, int] = {StepMode.MERGED: 0, StepMode.UNMERGED: 0}
        """Decode steps run in each mode."""
        self.step_rows: Counter[int] = Counter()
        """Decode steps by the number of rows in them (joiners prefilled in the step
        count): a step of k rows served k requests with one forward."""
        self.packed_joins = 0
        """Requests prefilled inside a decode step."""
        self._waiting: deque[tuple[Handle, ...]] = deque()
        """Requests, each as the handles of its choices (one prefill each)."""
        self._lock = threading.Lock()
        """Guards the queue (``submit`` runs on callers' threads)."""
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}

    # -- the queue -------------------------------------------------------------------------
    def submit(self, handle: Handle, *others: Handle) -> None:
        """Queue a request: its first choice's handle and those of its other choices."""
        self.submit_all([(handle, *others)])

    def submit_all(self, requests: Sequence[Sequence[Handle]]) -> None:
        """Queue requests (each as its choices' handles) at once: admission sees all or
        none of them."""
        with self._lock:
            self._waiting.extend(tuple(r) for r in requests)

    def busy(self) -> bool:
        with self._lock:
            return bool(self._waiting or self.rows)

    def load(self) -> tuple[int, int]:
        """(requests waiting to be admitted, requests running)."""
        with self._lock:
            return sum(len(c) for c in self._waiting), len(self.rows)

    # -- admitting -------------------------------------------------------------------------
    def admit(self, prefill_s: float | None) -> list[Admitted]:
        """Take waiting requests while the batch has room and hold their adapters' slots.
        Those a decode step can prefill join ``joining``; returns the others, to prefill
        on their own. ``prefill_s``: a prefill's running mean time (``join_wait``'s unit)."""
        if self.policy.batching is Batching.STATIC and self.rows:
            return []
        if self._wait_for_company(prefill_s):
            return []
        group = self._take_waiting()
        if group and self.policy.packs and self.rows:
            group = self._to_pack(group)
        return group

    def _take_waiting(self) -> list[Admitted]:
        group: list[Admitted] = []
        used = len(self.rows)
        while True:
            with self._lock:
                if not self._waiting or used + len(self._waiting[0]) > self.policy.max_batch:
                    break
                choices = self._waiting.popleft()
            for h in choices:
                if h.cancelled:
                    end(h, FinishReason.CANCELLED)
            handles = [h for h in choices if not h.cancelled]
            if not handles:
                continue
            try:
                ids, adapter = self.resolve(handles[0].request)
                slot = self._acquire(adapter, len(handles))
            except (AdapterInUseError, CacheFullError) as e:
                if self.rows or group:  # room comes back as running rows finish
                    with self._lock:
                        self._waiting.appendleft(tuple(handles))
                    break
                self._reject_choices(handles, e)
                continue
            except Exception as e:  # a bad request fails alone
                self._reject_choices(handles, e)
                continue
            group.append(Admitted(handles[0], tuple(ids), adapter, slot, tuple(handles[1:])))
            used += len(handles)
        return group

    def _acquire(self, adapter: str, times: int) -> int:
        """Hold ``adapter``'s slot ``times`` times (one per choice: each row releases it)."""
        slot = self.table.acquire(adapter)
        for held in range(1, times):
            again = self.table.acquire(adapter)
            if again != slot:  # the adapter changed under us: let go of everything
                for index in [slot] * held + [again]:
                    self.table.release(index)
                raise RuntimeError(f"adapter {adapter!r} moved slots while being acquired")
        return slot

    def _reject_choices(self, handles: Sequence[Handle], error: Exception) -> None:
        for h in handles:
            self.reject(h, error)

    def _to_pack(self, group: list[Admitted]) -> list[Admitted]:
        """Set aside for the next decode step the requests it can prefill (not a prefix
        adapter's, not one asking for prompt log-probabilities; up to ``PACK_TOKENS``
        prompt tokens in all); returns the others."""
        alone, total = [], 0
        for a in group:
            if (self.table.kind_of(a.slot) != PREFIX and not a.full_logits
                    and total + len(a.ids) <= PACK_TOKENS):
                self.joining.append(a)
                total += len(a.ids)
            else:
                alone.append(a)
        return alone

    def _wait_for_company(self, prefill_s: float | None) -> bool:
        """True while fewer requests wait than rows are free and the oldest has waited
        under ``join_wait`` prefill times: one prefill then serves several of them."""
        p = self.policy
        if p.packs or not self.rows or p.join_wait <= 0 or prefill_s is None:
            return False
        with self._lock:
            waiting = sum(len(c) for c in self._waiting)
            oldest = self._waiting[0][0].submitted if waiting else None
        return (oldest is not None and waiting < p.max_batch - len(self.rows)
                and self.clock() - oldest < p.join_wait * prefill_s)

    def orphans(self) -> list[Admitted]:
        """The joiners whose batch has ended before the step that was to prefill them
        (they then prefill on their own)."""
        if not self.joining or self.rows:
            return []
        group, self.joining = self.joining, []
        return group

    def prefill_parts(self, group: Sequence[Admitted]) -> list[list[Admitted]]:
        """The prefill forwards of ``group``: one, or by prompt on a windowed model
        (``grouping``), with the requests that need logits at every prompt position in
        forwards of their own (the others keep computing the last position's only); each
        sorted by slot, so rows sharing a slot are adjacent."""
        parts = prefill_groups([len(a.ids) for a in group],
                               [self.table.kind_of(a.slot) == PREFIX for a in group],
                               self.windowed)
        split = [[group[i] for i in part if group[i].full_logits is full]
                 for part in parts for full in (False, True)]
        return [sorted(part, key=lambda a: a.slot) for part in split if part]

    # -- planning a step -------------------------------------------------------------------
    def plan_step(self) -> StepPlan:
        """Merged or unmerged for the running rows and the joiners (the slot table plans,
        merging or switching as it decides); counts the step in ``modes``."""
        slots = [r.slot for r in self.rows] + [a.slot for a in self.joining]
        budget = min([r.handle.request.max_new_tokens - len(r.tokens) for r in self.rows]
                     + [a.handle.request.max_new_tokens for a in self.joining])
        plan = self.table.plan_slots(slots, self.policy.merge_min_tokens, budget)
        mode = StepMode(plan.mode)
        self.modes[mode] += 1
        self.step_rows[len(slots)] += 1
        if mode is StepMode.UNMERGED and self.table.merged_index is not None:
            self.table.unmerge()  # else every layer subtracts it again at every step
        if mode is StepMode.MERGED:
            uniform: int | None = plan.slots[0]
        else:
            uniform = slots[0] if len(set(slots)) == 1 else None
        return StepPlan(mode, tuple(slots), uniform)

    def take_joining(self) -> list[Admitted]:
        """The joiners, once the step prefilling them has run."""
        joining, self.joining = self.joining, []
        return joining

    # -- rows ------------------------------------------------------------------------------
    def add(self, rows: list[Row], *, packed: bool = False) -> list[int] | None:
        """Rows join the batch (``packed``: prefilled inside a decode step); the new order
        of the batch's rows if it changed (the cache's rows must follow)."""
        self.rows += rows
        if packed:
            self.packed_joins += len(rows)
        slots = [r.slot for r in self.rows]
        if all(x <= y for x, y in itertools.pairwise(slots)):
            return None
        order = sorted(range(len(slots)), key=slots.__getitem__)
        self.rows = [self.rows[i] for i in order]
        return order

    def retire(self) -> list[int] | None:
        """End the rows that are done (stop string, end of sequence, budget, cancelled,
        failed) and release their slots; the rows kept, in order, if any ended."""
        keep = []
        for i, row in enumerate(self.rows):
            reason, text = row.status(self.tokenizer, self.eos)
            if reason is None:
                keep.append(i)
                continue
            self.table.release(row.slot)
            end(row.handle, reason, row.tokens, text, row.prompt_len, first=row.first_token_s,
                adapter=row.adapter, error=row.error, prompt_logprobs=row.prompt_logprobs)
        if len(keep) == len(self.rows):
            return None
        self.rows = [self.rows[i] for i in keep]
        return keep

    # -- failures --------------------------------------------------------------------------
    def reject(self, handle: Handle, error: Exception) -> None:
        """End a request that could not be admitted or prefilled."""
        logger.warning("request %d failed: %s", handle.id, error)
        if not isinstance(error, ValueError | KeyError | CacheFullError):  # not the request
            self.health.failed(error)
        end(handle, FinishReason.ERROR, error=error)

    def reject_all(self, group: Sequence[Admitted], error: Exception) -> None:
        """A prefill of ``group`` failed: release their slots and end them."""
        for a in group:
            for h in a.handles:
                self.table.release(a.slot)
                self.reject(h, error)

    def fail_running(self, error: BaseException) -> None:
        """End every running and joining request with ``error`` (a step failed), so none
        is left hanging; the engine drops the batch's cache with them."""
        self.fail_joining(error)
        rows, self.rows = self.rows, []
        for row in rows:
            try:
                self.table.release(row.slot)
            except Exception:
                logger.exception("releasing slot %d failed", row.slot)
            end(row.handle, FinishReason.ERROR, row.tokens, row.text, row.prompt_len,
                first=row.first_token_s, error=error, adapter=row.adapter)

    def fail_joining(self, error: BaseException) -> None:
        """End the requests admitted to join the next decode step with ``error``."""
        for a in self.take_joining():
            for h in a.handles:
                self.table.release(a.slot)
                end(h, FinishReason.ERROR, error=error, adapter=a.adapter)


def end(handle: Handle, reason: FinishReason, tokens: Sequence[int] = (), text: str = "",
        prompt_len: int = 0, *, first: float = 0.0, error: BaseException | None = None,
        adapter: str | None = None,
        prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None) -> None:
    """Finish ``handle`` with its completion (and the log-probabilities it asked for)."""
    total = time.perf_counter() - handle.submitted
    message = None if error is None else f"{type(error).__name__}: {error}"
    logprobs = None if handle.logprobs is None else tuple(handle.logprobs)
    handle._finish(Completion(text, tuple(tokens), reason, adapter or handle.request.adapter,
                              prompt_len, message, first, total, error, logprobs,
                              prompt_logprobs))
