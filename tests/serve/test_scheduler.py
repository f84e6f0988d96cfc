"""The scheduler alone, with a fake slot table and no model: admission (batch room, slots,
static batching, join_wait, packing), retirement, the merge plan and failures."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from loratree.errors import AdapterInUseError, CacheFullError
from loratree.serve.requests import FinishReason, Handle, Request
from loratree.serve.rows import Row
from loratree.serve.scheduler import Admitted, Batching, Policy, Scheduler, StepMode, StepPlan

EOS = 0


@dataclass(frozen=True)
class _Plan:
    mode: str
    slots: tuple[int, ...]


class FakeTable:
    """The slot table's few methods the scheduler uses, as plain bookkeeping: adapter
    ``name`` lives in slot ``slots[name]``; ``pfx*`` names are prefix adapters."""

    def __init__(self, slots: dict[str, int], busy: frozenset[str] = frozenset()) -> None:
        self.slots, self.busy = slots, busy
        self.held: dict[int, int] = {}
        self.merged_index: int | None = None
        self.unmerges = 0

    def acquire(self, name: str) -> int:
        if name in self.busy:
            raise AdapterInUseError(f"{name} has no free slot")
        if name == "huge":
            raise CacheFullError("too big")
        slot = self.slots[name]  # a KeyError: an unknown adapter, the request's fault
        self.held[slot] = self.held.get(slot, 0) + 1
        return slot

    def release(self, index: int) -> None:
        assert self.held.get(index, 0) > 0, f"slot {index} is not held"
        self.held[index] -= 1

    def kind_of(self, index: int) -> str:
        if index < 0:
            return "base"
        name = next(n for n, s in self.slots.items() if s == index)
        return "prefix" if name.startswith("pfx") else "lora"

    def plan_slots(self, slots: list[int], merge_min_tokens: int = 16,
                   new_tokens: int = 0) -> _Plan:
        only = slots[0] if len(set(slots)) == 1 else -1
        if only >= 0 and self.kind_of(only) == "lora" and (
                self.merged_index == only or new_tokens >= merge_min_tokens):
            self.merged_index = only
            return _Plan("merged", tuple(slots))
        return _Plan("unmerged", tuple(slots))

    def unmerge(self) -> None:
        self.unmerges += 1
        self.merged_index = None

    def in_use(self) -> int:
        return sum(self.held.values())


class FakeTokenizer:
    eos_token_id = EOS

    def decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + t % 26) for t in tokens)


def _resolve(req: Request) -> tuple[list[int], str]:
    if not req.prompt:
        raise ValueError("the prompt is empty")
    return list(req.prompt), req.adapter


def _scheduler(table: FakeTable | None = None, clock: list[float] | None = None,
               **policy: object) -> Scheduler:
    table = table or FakeTable({"a": 0, "b": 1, "pfx": 2})
    now = clock if clock is not None else [0.0]
    return Scheduler(table, FakeTokenizer(), _resolve, Policy(**policy),
                     clock=lambda: now[0])


_ids = iter(range(10**6))


def _submit(s: Scheduler, adapter: str = "a", prompt: tuple[int, ...] = (5, 6, 7),
            n: int = 4, at: float = 0.0, **kw: object) -> Handle:
    handle = Handle(next(_ids), Request(list(prompt), adapter=adapter, max_new_tokens=n,
                                        **kw))
    handle.submitted = at
    s.submit(handle)
    return handle


def _run(s: Scheduler, group: list[Admitted], *, packed: bool = False) -> list[int] | None:
    """What the runner does after a prefill: a row per request, with a first token."""
    rows = []
    for a in group:
        row = Row.start(a.handle, a.adapter, a.slot, len(a.ids), len(a.ids))
        row.tokens.append(3)
        rows.append(row)
    return s.add(rows, packed=packed)


def test_admits_up_to_the_batch_room_and_holds_each_slot():
    table = FakeTable({"a": 0, "b": 1})
    s = _scheduler(table, max_batch=3)
    handles = [_submit(s, name) for name in ("b", "a", "b", "a")]
    group = s.admit(prefill_s=None)
    assert [a.handle for a in group] == handles[:3]
    assert group[0] == Admitted(handles[0], (5, 6, 7), "b", 1)
    assert table.held == {1: 2, 0: 1} and s.load() == (1, 0)
    assert _run(s, group) == [1, 0, 2]  # sorted by slot: the cache rows must follow
    assert [r.slot for r in s.rows] == [0, 1, 1] and s.load() == (1, 3)
    assert s.admit(prefill_s=None) == []  # no room


def test_bad_requests_fail_alone_and_cancelled_ones_end_before_running():
    table = FakeTable({"a": 0})
    s = _scheduler(table)
    unknown = _submit(s, "nope")
    empty = _submit(s, "a", prompt=())
    cancelled = _submit(s, "a")
    cancelled.cancel()
    good = _submit(s, "a")
    group = s.admit(prefill_s=None)
    assert [a.handle for a in group] == [good]
    assert unknown.result().finish_reason is FinishReason.ERROR
    assert "KeyError" in unknown.result().error
    assert empty.result().finish_reason == "error"
    assert cancelled.result().finish_reason is FinishReason.CANCELLED
    assert s.health.faults == 0  # the requests' own faults, not the engine's
    assert table.held == {0: 1}


def test_no_free_slot_waits_while_rows_run_and_fails_into_an_empty_batch():
    table = FakeTable({"a": 0, "b": 1}, busy=frozenset({"b"}))
    s = _scheduler(table)
    alone = _submit(s, "b")
    s.admit(prefill_s=None)
    assert alone.result().finish_reason == "error" and s.health.faults == 1
    _submit(s, "a")
    _run(s, s.admit(prefill_s=None))
    waits = _submit(s, "b")
    assert s.admit(prefill_s=None) == [] and not waits.done
    assert s.load() == (1, 1)  # back at the head of the queue


def test_a_cache_too_small_fails_the_request_not_the_engine():
    s = _scheduler(FakeTable({"huge": 0}))
    h = _submit(s, "huge")
    s.admit(prefill_s=None)
    assert h.result().finish_reason == "error" and s.health.faults == 0


def test_static_batching_admits_only_into_an_empty_batch():
    s = _scheduler(max_batch=4, batching=Batching.STATIC, packs=False)
    _submit(s)
    _run(s, s.admit(prefill_s=None))
    _submit(s, "b")
    assert s.admit(prefill_s=None) == []
    s.rows[0].tokens.extend([3, 3, 3])  # its budget of 4 is spent
    assert s.retire() == []
    assert [a.adapter for a in s.admit(prefill_s=None)] == ["b"]


def test_a_lone_joiner_waits_for_company_up_to_join_wait_prefill_times():
    now = [0.0]
    s = _scheduler(clock=now, max_batch=3, packs=False, join_wait=2.0)
    _submit(s, at=0.0)
    _run(s, s.admit(prefill_s=0.5))  # into an empty batch: at once
    _submit(s, "b", at=1.0)
    now[0] = 1.9  # one waiting, two rows free, waited 0.9 s of 2 x 0.5 s
    assert s.admit(prefill_s=0.5) == []
    assert s.load() == (1, 1)
    now[0] = 2.1  # waited long enough
    _run(s, s.admit(prefill_s=0.5))
    _submit(s, at=2.1)  # as many waiting as rows are free: joins at once
    assert len(s.admit(prefill_s=0.5)) == 1


def test_without_a_measured_prefill_or_with_join_wait_0_nobody_waits():
    for prefill_s, join_wait in ((None, 2.0), (0.5, 0.0)):
        s = _scheduler(max_batch=3, packs=False, join_wait=join_wait)
        _submit(s)
        _run(s, s.admit(prefill_s))
        _submit(s, "b")
        assert len(s.admit(prefill_s)) == 1


def test_joiners_pack_up_to_the_token_budget_and_prefix_adapters_prefill_alone(monkeypatch):
    import loratree.serve.scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "PACK_TOKENS", 6)
    s = _scheduler()
    _submit(s)
    _run(s, s.admit(prefill_s=None))  # nothing runs yet: prefilled alone
    assert s.joining == []
    _submit(s, "b", prompt=(1, 2, 3, 4))
    _submit(s, "pfx", prompt=(1,))
    _submit(s, "a", prompt=(1, 2, 3))  # 4 + 3 > 6
    _submit(s, "b", prompt=(9, 9))
    alone = s.admit(prefill_s=None)
    assert [a.adapter for a in alone] == ["pfx", "a"]
    assert [a.ids for a in s.joining] == [(1, 2, 3, 4), (9, 9)]
    plan = s.plan_step()
    assert plan == StepPlan(StepMode.UNMERGED, (0, 1, 1), None)
    joined = s.take_joining()
    assert s.joining == [] and _run(s, joined, packed=True) is None
    assert s.packed_joins == 2


def test_orphaned_joiners_prefill_on_their_own():
    s = _scheduler()
    _submit(s)
    _run(s, s.admit(prefill_s=None))
    _submit(s, "b")
    assert s.admit(prefill_s=None) == [] and len(s.joining) == 1
    assert s.orphans() == []  # their batch still runs
    s.rows[0].handle.cancel()
    s.retire()
    orphans = s.orphans()
    assert [a.adapter for a in orphans] == ["b"] and s.joining == []
    assert s.prefill_parts(orphans) == [orphans]


def test_windowed_prefill_parts_split_prefix_rows_by_prompt_length_sorted_by_slot():
    s = _scheduler(FakeTable({"a": 0, "b": 1, "pfx": 2, "pfx2": 3}))
    s.windowed = True
    for name, prompt in (("b", (1, 2)), ("pfx2", (1, 2, 3)), ("a", (4,)), ("pfx", (5, 6, 7)),
                         ("pfx", (5,))):
        _submit(s, name, prompt)
    parts = s.prefill_parts(s.admit(prefill_s=None))
    assert [[(a.adapter, len(a.ids)) for a in p] for p in parts] == [
        [("a", 1), ("b", 2)], [("pfx", 3), ("pfx2", 3)], [("pfx", 1)]]


def test_the_plan_merges_one_adapter_for_a_long_enough_batch_and_unmerges_for_a_mix():
    table = FakeTable({"a": 0, "b": 1})
    s = _scheduler(table, merge_min_tokens=4, packs=False)
    _submit(s, n=3)
    _submit(s, n=8)
    _run(s, s.admit(prefill_s=None))
    assert s.plan_step().mode is StepMode.UNMERGED  # 3 - 1 tokens left < 4
    assert s.plan_step() == StepPlan(StepMode.UNMERGED, (0, 0), 0)  # one slot: no gather
    s.rows[0].tokens.extend([3, 3])
    s.retire()
    assert s.plan_step() == StepPlan(StepMode.MERGED, (0,), 0)
    assert table.merged_index == 0
    _submit(s, "b")
    _run(s, s.admit(prefill_s=None))
    assert s.plan_step() == StepPlan(StepMode.UNMERGED, (0, 1), None)
    assert table.unmerges == 1 and table.merged_index is None
    assert s.modes == {"merged": 1, "unmerged": 3}


def test_retire_ends_rows_by_stop_string_eos_budget_and_cancel_and_frees_slots():
    table = FakeTable({"a": 0, "b": 1})
    s = _scheduler(table)
    stop = _submit(s, stop=("d",))
    eos = _submit(s, "b")
    budget = _submit(s, n=2)
    cancel = _submit(s, "b")
    going = _submit(s, "b", n=10)
    _run(s, s.admit(prefill_s=None))  # each row's first token is 3: "d"
    by = {r.handle: r for r in s.rows}
    by[eos].tokens.append(EOS)
    by[budget].tokens.append(4)
    cancel.cancel()
    keep = s.retire()
    assert [s.rows[i].handle for i in range(len(s.rows))] == [going]
    assert keep == [[r.handle for r in by.values()].index(going)]
    assert stop.result().finish_reason is FinishReason.STOP and stop.result().text == ""
    assert eos.result().finish_reason == "stop" and eos.result().text == "d"
    assert budget.result().finish_reason == "length" and budget.result().tokens == (3, 4)
    assert cancel.result().finish_reason == "cancelled"
    assert table.in_use() == 1
    assert s.retire() is None  # nothing ended: the cache stays as it is


def test_failures_end_running_and_joining_requests_and_release_every_slot():
    table = FakeTable({"a": 0, "b": 1})
    s = _scheduler(table)
    running = _submit(s)
    _run(s, s.admit(prefill_s=None))
    joiner = _submit(s, "b")
    s.admit(prefill_s=None)
    error = RuntimeError("device lost")
    s.health.failed(error)
    s.fail_running(error)
    for h in (running, joiner):
        assert h.result().finish_reason == "error" and "device lost" in h.result().error
        assert h.result().exception is error
    assert running.result().tokens == (3,)
    assert table.in_use() == 0 and not s.busy()
    assert (s.health.faults, s.health.consecutive_failures) == (1, 1)
    assert s.health.last_error == "RuntimeError: device lost"
    s.health.ok()
    assert s.health.consecutive_failures == 0 and s.health.faults == 1


def test_a_failed_prefill_rejects_its_group_and_counts_an_engine_fault():
    table = FakeTable({"a": 0, "b": 1})
    s = _scheduler(table)
    handles = [_submit(s), _submit(s, "b")]
    group = s.admit(prefill_s=None)
    s.reject_all(group, RuntimeError("out of memory"))
    assert all(h.result().finish_reason == "error" for h in handles)
    assert table.in_use() == 0 and s.health.faults == 2


def test_modes_and_finish_reasons_are_their_api_strings():
    assert [str(m) for m in StepMode] == ["merged", "unmerged"]
    assert [str(r) for r in FinishReason] == ["stop", "length", "cancelled", "error"]
    assert f"{FinishReason.LENGTH}" == "length" and str(Batching.STATIC) == "static"


@pytest.mark.parametrize("batching", list(Batching))
def test_the_policy_is_frozen(batching):
    policy = Policy(batching=batching)
    with pytest.raises(AttributeError):
        policy.max_batch = 2  # type: ignore[misc]
