"""Which plan ``choose_plan`` picks for each batch layout: a silent fallback to the
per-slot gather (``Segmented``) where a batched path applies fails here."""

import pytest
import torch

from loratree.ops import plan as plans
from loratree.ops.plan import (
    NO_BRANCH,
    Grouped,
    GroupedRows,
    Runs,
    Segmented,
    Uniform,
    choose_plan,
    describe,
)

LIVE = frozenset({0, 1, 2})


def _batch(rows: list[int], tokens_per_row: int):
    """The ``Batch`` of a per-row index, each row ``tokens_per_row`` tokens long."""
    index = torch.tensor(rows)
    return describe(index.repeat_interleave(tokens_per_row), rows)


def _choose(rows, t, live=LIVE, grad=False, dropout=False, grouped=True):
    return choose_plan(_batch(rows, t), live, grad=grad, dropout=dropout, grouped=grouped)


def test_no_live_slot_in_the_batch_is_no_branch():
    assert _choose([3, 3, -1], 5) is NO_BRANCH  # slot 3 skips this layer
    assert _choose([0, 1], 5, live=frozenset()) is NO_BRANCH
    assert _choose([-1, -1], 5) is NO_BRANCH  # the base model alone


def test_every_row_on_one_slot_is_uniform():
    assert _choose([1, 1, 1], 7) == Uniform(1)
    assert _choose([1, 1], 7, grad=True, dropout=True) == Uniform(1, dropout=True)


@pytest.mark.parametrize("t", [1, 20])  # a decode step, a prefill: a view either way
def test_rows_sorted_by_slot_as_many_each_are_grouped_on_a_view(t):
    plan = _choose([-1, 0, 0, 1, 1, 2, 2], t)
    assert isinstance(plan, Grouped) and plan.layout.gather is None
    assert plan.layout.slots == (0, 1, 2) and plan.layout.m == 2 * t
    assert plan.layout.lo == t  # after the base row


def test_a_decode_step_in_any_order_is_grouped_by_gathering():
    plan = _choose([2, 0, 1, 0, 2, 2], 1)
    assert isinstance(plan, Grouped) and plan.layout.gather is not None
    assert plan.layout.slots == (0, 1, 2)


def test_a_slot_that_skips_the_layer_is_left_out_of_the_group():
    plan = _choose([3, 0, 1, 0], 1)  # slot 3 is not live
    assert isinstance(plan, Grouped) and plan.layout.slots == (0, 1)


def test_runs_of_rows_past_a_decode_step_run_in_place():
    plan = _choose([2, 2, 0, 0, 0, 1], 20)  # uneven: no view; 120 tokens: no gather
    assert plan == Runs(((2, 0, 40), (0, 40, 100), (1, 100, 120)))
    assert _choose([2, 2, 3, 0], 20, live=frozenset({0, 2})) == Runs(((2, 0, 40), (0, 60, 80)))


def test_a_long_per_token_mix_is_segmented():
    index = torch.tensor([[0, 1, 2, 1] * 20])  # one row, tokens on different slots
    plan = choose_plan(describe(index.reshape(-1)), LIVE, grad=False, dropout=False,
                       grouped=True)
    assert isinstance(plan, Segmented) and plan.seg.slots == (0, 1, 2)


def test_too_many_runs_fall_back_to_segmented():
    plan = _choose([0, 1] * 40, 2)  # 80 runs of 2 slots, 160 tokens
    assert isinstance(plan, Segmented) and not plan.dropout


def test_training_on_rows_sorted_by_slot_is_grouped_rows():
    plan = _choose([0, 0, 1, 1, 2, 2], 8, grad=True)
    assert isinstance(plan, GroupedRows) and plan.layout.gather is None
    assert plan.layout.slots == (0, 1, 2) and plan.layout.lo == 0 and plan.layout.m == 16


def test_training_with_dropout_is_segmented_with_dropout():
    plan = _choose([0, 0, 1, 1, 2, 2], 8, grad=True, dropout=True)
    assert isinstance(plan, Segmented) and plan.dropout


def test_training_in_any_order_is_segmented():
    assert isinstance(_choose([2, 0, 1], 8, grad=True), Segmented)


def test_a_layer_without_batched_matmuls_is_segmented():
    assert isinstance(_choose([0, 0, 1, 1], 1, grouped=False), Segmented)
    assert isinstance(_choose([0, 1], 20, grouped=False), Segmented)


def test_a_segmented_plan_keeps_only_live_slots():
    plan = _choose([0, 3] * 40, 2, live=frozenset({0, 1}))
    assert isinstance(plan, Segmented) and plan.seg.slots == (0,)


def test_the_gather_threshold_is_a_decode_step():
    rows = [2, 0, 1, 0, 2, 2]
    t = plans.GATHER_MAX_TOKENS // len(rows)
    assert isinstance(_choose(rows, t), Grouped)
    assert isinstance(_choose(rows, t + 1), Runs)
