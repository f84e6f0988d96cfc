"""Which plan a real forward runs (``SlotContext.last_plan``) for each batch layout, and
that each equals every row alone: a layer that silently took the slow path fails here."""

import pytest
import torch
from torch import nn

from loratree.layers import LoraConv, LoraLinear, SlotContext, SlotSpec
from loratree.ops.plan import Grouped, GroupedRows, NoBranch, Runs, Segmented, Uniform


def _layer(ranks=(2, 4, 3, 0), stacked=False):
    ctx = SlotContext()
    layer = LoraLinear(nn.Linear(6, 5), ctx)
    g = torch.Generator().manual_seed(0)
    for r in ranks:
        layer.add_slot(SlotSpec(r, 2.0))
    with torch.no_grad():
        for p in (*layer.lora_a, *layer.lora_b):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    if stacked:
        layer.stack_slots()
    return layer, ctx


LAYOUTS = [  # (rows' slots, tokens per row, grad, the plan)
    ([3, 3, -1], 4, False, NoBranch),  # slot 3 skips the layer
    ([1, 1, 1], 4, False, Uniform),
    ([0, 0, 1, 1, 2, 2], 1, False, Grouped),  # sorted decode step: a view
    ([-1, 0, 0, 1, 1], 20, False, Grouped),  # sorted prefill: a view
    ([2, 0, 1, 0, 2, 2], 1, False, Grouped),  # a decode step in any order: gathered
    ([2, 2, 0, 0, 0, 1], 20, False, Runs),  # a prefill, runs of rows
    ([0, 1] * 40, 2, False, Segmented),  # too many runs
    ([0, 0, 1, 1, 2, 2], 3, True, GroupedRows),  # training, sorted rows
    ([2, 0, 1], 3, True, Segmented),  # training, any order
]


@pytest.mark.parametrize("stacked", [False, True], ids=["own", "stacked"])
@pytest.mark.parametrize(("rows", "t", "grad", "kind"), LAYOUTS)
def test_each_layout_runs_its_plan_and_equals_each_row_alone(rows, t, grad, kind, stacked):
    layer, ctx = _layer(stacked=stacked)
    x = torch.randn(len(rows), t, 6)
    with torch.set_grad_enabled(grad), ctx.use(torch.tensor(rows)):
        mixed = layer(x)
        assert isinstance(ctx.last_plan, kind), ctx.last_plan
    with torch.no_grad():
        for i, slot in enumerate(rows):
            with ctx.use(slot):
                torch.testing.assert_close(mixed[i], layer(x[i]), atol=1e-6, rtol=0)


def test_a_per_token_mix_is_segmented():
    layer, ctx = _layer()
    index = torch.tensor([[0, 1, 2, 1] * 20])
    with torch.no_grad(), ctx.use(index):
        layer(torch.randn(1, 80, 6))
    assert isinstance(ctx.last_plan, Segmented)


def test_training_with_dropout_is_segmented_with_dropout():
    ctx = SlotContext()
    layer = LoraLinear(nn.Linear(6, 5), ctx)
    for _ in range(2):
        layer.add_slot(SlotSpec(2, 2.0, dropout=0.5))
    layer.train()
    with ctx.use(torch.tensor([0, 0, 1, 1])):
        layer(torch.randn(4, 3, 6))
    assert isinstance(ctx.last_plan, Segmented) and ctx.last_plan.dropout


def test_one_slot_for_every_token_is_uniform_and_the_base_no_branch():
    layer, ctx = _layer()
    with ctx.use(1):
        layer(torch.randn(2, 6))
    assert ctx.last_plan == Uniform(1)
    with ctx.use(-1):
        layer(torch.randn(2, 6))
    assert isinstance(ctx.last_plan, NoBranch)


def test_a_conv_layer_runs_per_slot():
    ctx = SlotContext()
    layer = LoraConv(nn.Conv1d(3, 4, 3, padding=1), ctx)
    for _ in range(2):
        layer.add_slot(SlotSpec(2, 2.0))
    with torch.no_grad(), ctx.use(torch.tensor([0, 1, 0])):
        layer(torch.randn(3, 3, 7))
    assert isinstance(ctx.last_plan, Segmented)


def test_set_slot_rewrites_the_stacked_row_and_nothing_else():
    """A serving table's stacks: set_slot copies the new factors, scale folded into B,
    zero-padded past the slot's rank, into row s only."""
    layer, _ = _layer(stacked=True)
    assert layer.a_stack.shape == (4, 4, 6) and layer.b_stack.shape == (4, 5, 4)
    before_a, before_b = layer.a_stack.clone(), layer.b_stack.clone()
    a, b = torch.randn(2, 6), torch.randn(5, 2)
    layer.set_slot(1, SlotSpec(2, 8.0), a, b)
    assert torch.equal(layer.a_stack[1, :2], a) and not layer.a_stack[1, 2:].any()
    torch.testing.assert_close(layer.b_stack[1, :, :2], b * 4.0)
    assert not layer.b_stack[1, :, 2:].any()
    for s in (0, 2, 3):
        assert torch.equal(layer.a_stack[s], before_a[s])
        assert torch.equal(layer.b_stack[s], before_b[s])


def test_a_larger_rank_grows_the_stacks():
    layer, ctx = _layer(stacked=True)
    layer.set_slot(3, SlotSpec(6, 2.0), torch.randn(6, 6), torch.randn(5, 6))
    assert layer.a_stack.shape == (4, 6, 6) and layer.b_stack.shape == (4, 5, 6)
    x = torch.randn(4, 1, 6)
    with torch.no_grad(), ctx.use(torch.tensor([3, 0, 1, 3])):
        mixed = layer(x)
    with torch.no_grad():
        for i, slot in enumerate([3, 0, 1, 3]):
            with ctx.use(slot):
                torch.testing.assert_close(mixed[i], layer(x[i]), atol=1e-6, rtol=0)


def test_a_stacked_layer_moved_to_another_dtype_serves_from_the_moved_stacks():
    layer, ctx = _layer(stacked=True)
    x = torch.randn(4, 1, 6, dtype=torch.float64)
    with torch.no_grad(), ctx.use(torch.tensor([0, 0, 1, 1])):
        layer(x.float())  # derives the factors from the float32 stacks
        layer.double()
        assert layer.a_stack.dtype == torch.float64
        mixed = layer(x)
    with torch.no_grad():
        for i, slot in enumerate([0, 0, 1, 1]):
            with ctx.use(slot):
                torch.testing.assert_close(mixed[i], layer(x[i]), atol=1e-9, rtol=0)
