"""Each LoRA layer against its naive formula, written out here."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from loratree.layers import LoraConv, LoraEmbedding, LoraLinear, SlotContext, SlotSpec


def _fill(layer, slot=0, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.lora_a[slot], layer.lora_b[slot]):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("rslora", [False, True])
def test_linear_matches_naive_formula(rslora):
    base = nn.Linear(6, 5)
    layer = LoraLinear(base, SlotContext())
    layer.add_slot(SlotSpec(3, 6.0, rslora=rslora))
    _fill(layer)
    x = torch.randn(2, 4, 6)
    s = 6.0 / (3**0.5 if rslora else 3)
    a, b = layer.lora_a[0], layer.lora_b[0]
    naive = x @ base.weight.t() + base.bias + s * (x @ a.t()) @ b.t()
    torch.testing.assert_close(layer(x), naive, atol=1e-6, rtol=0)


def test_gpt2_conv1d_matches_naive_formula():
    base = Conv1D(5, 6)  # nf=out=5, nx=in=6; weight (in, out)
    layer = LoraLinear(base, SlotContext(), fan_in_fan_out=True)
    layer.add_slot(SlotSpec(2, 4.0))
    _fill(layer)
    x = torch.randn(3, 6)
    a, b = layer.lora_a[0], layer.lora_b[0]
    naive = x @ base.weight + base.bias + 2.0 * (x @ a.t()) @ b.t()
    torch.testing.assert_close(layer(x), naive, atol=1e-6, rtol=0)
    merged_w = base.weight + 2.0 * (b @ a).t()
    torch.testing.assert_close(layer.delta_weight(0), merged_w - base.weight, atol=1e-6, rtol=0)


def test_embedding_matches_naive_formula():
    base = nn.Embedding(11, 4, padding_idx=0)
    layer = LoraEmbedding(base, SlotContext())
    layer.add_slot(SlotSpec(3, 3.0))
    _fill(layer)
    ids = torch.tensor([[1, 5, 0], [10, 2, 2]])
    table = base.weight + 1.0 * (layer.lora_b[0] @ layer.lora_a[0]).t()  # (11, 4)
    torch.testing.assert_close(layer(ids), table[ids], atol=1e-6, rtol=0)


@pytest.mark.parametrize("dims", [1, 2])
def test_conv_matches_naive_formula(dims):
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    base = conv(3, 4, 3, stride=1, padding=1, dilation=1)
    layer = LoraConv(base, SlotContext())
    layer.add_slot(SlotSpec(2, 4.0))
    _fill(layer)
    x = torch.randn(2, 3, *([7] * dims))
    a, b = layer.lora_a[0], layer.lora_b[0]
    w = base.weight + 2.0 * (b.flatten(1) @ a.flatten(1)).reshape(base.weight.shape)
    fn = F.conv1d if dims == 1 else F.conv2d
    naive = fn(x, w, base.bias, padding=1)
    torch.testing.assert_close(layer(x), naive, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_fresh_slot_is_an_exact_no_op(init):
    base = nn.Linear(8, 8)
    layer = LoraLinear(base, SlotContext())
    layer.add_slot(SlotSpec(4, 8.0), init=init)
    assert torch.count_nonzero(layer.lora_b[0]) == 0
    assert torch.count_nonzero(layer.lora_a[0]) > 0
    x = torch.randn(3, 8)
    assert torch.equal(layer(x), base(x))


def test_per_token_slots_equal_each_row_alone():
    ctx = SlotContext()
    layer = LoraLinear(nn.Linear(6, 5), ctx)
    for slot, r in enumerate((2, 4)):
        layer.add_slot(SlotSpec(r, 2.0))
        _fill(layer, slot, seed=slot)
    x = torch.randn(4, 3, 6)
    index = torch.tensor([[0, 1, -1], [1, 1, 1], [-1, 0, 0], [0, -1, 1]])
    with ctx.use(index):
        mixed = layer(x)
    for i in range(4):
        for t in range(3):
            with ctx.use(int(index[i, t])):
                alone = layer(x[i, t])
            torch.testing.assert_close(mixed[i, t], alone, atol=1e-6, rtol=0)


def test_dropout_is_per_slot_and_only_in_training():
    ctx = SlotContext()
    layer = LoraLinear(nn.Linear(64, 64), ctx)
    layer.add_slot(SlotSpec(4, 4.0, dropout=0.5))
    _fill(layer)
    x = torch.randn(8, 64)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_a_bad_slot_index_is_a_clear_error():
    ctx = SlotContext()
    layer = LoraLinear(nn.Linear(4, 4), ctx, name="q")
    layer.add_slot(SlotSpec(2, 2.0))
    with ctx.use(3), pytest.raises(ValueError, match="slot 3"):
        layer(torch.randn(2, 4))
    with pytest.raises(TypeError):
        ctx.set(torch.tensor([0.5]))
    with ctx.use(torch.tensor([0, 0, 0])), pytest.raises(ValueError, match="rows"):
        layer(torch.randn(2, 5, 4))


def _mixed_equals_alone(index, x, changes=1):
    """A layer with slots of ranks 2, 4, 3 and 0 (an adapter that skips this layer); each
    row of a mixed inference batch equals the row alone, also after slot 1's weights change
    in place (``changes`` times: cached factors must follow)."""
    ctx = SlotContext()
    layer = LoraLinear(nn.Linear(6, 5), ctx)
    for slot, r in enumerate((2, 4, 3, 0)):
        layer.add_slot(SlotSpec(r, 2.0))
        if r:
            _fill(layer, slot, seed=slot)
    for _ in range(changes):
        with torch.no_grad(), ctx.use(torch.tensor(index)):
            mixed = layer(x)
        for i, slot in enumerate(index):
            with torch.no_grad(), ctx.use(slot):
                alone = layer(x[i])
            torch.testing.assert_close(mixed[i], alone, atol=1e-6, rtol=0)
        with torch.no_grad():
            layer.lora_b[1].mul_(-3.0)


@pytest.mark.parametrize("index", [[2, 2, -1, 0, 1], [1, 0, 1, 0, 1], [3, 3, 3, 0, -1],
                                   [-1, 0, 0, 2, 2], [0, 1, 2, 3, 3]])
def test_mixed_inference_over_long_rows_equals_each_row_alone(index):
    """Rows longer than a decode step (prefill): rows sorted by slot, as many per live slot,
    take one batched matmul pair over a view; other adjacent rows on one slot the in-place
    runs path; the rest the per-slot path."""
    _mixed_equals_alone(index, torch.randn(5, 20, 6))  # 100 tokens: more than a decode step


@pytest.mark.parametrize("index", [
    [0, 0, 1, 1, 2, 2],  # sorted, two rows per slot: the batched layout is a view
    [-1, 0, 1, 2, 3, 3],  # a base row, and slot 3 (rank 0 here) skips the layer
    [2, 0, 1, 0, 2, 2],  # unsorted and uneven: gathered
])
def test_mixed_decode_step_equals_each_row_alone(index):
    """Few tokens at inference (a decode step): every slot's rows in one batched matmul
    pair, ranks 2 and 3 padded to 4."""
    _mixed_equals_alone(index, torch.randn(6, 1, 6), changes=2)


def test_merge_and_switch_reach_a_conv_weight_that_is_not_contiguous():
    """A channels-last conv weight reads as a matrix copy, not a view: the update is
    written back, so the merged base equals the slot's output."""
    ctx = SlotContext()
    base = nn.Conv2d(3, 4, 3, padding=1).to(memory_format=torch.channels_last)
    layer = LoraConv(base, ctx)
    for slot in range(2):
        layer.add_slot(SlotSpec(2, 4.0))
        _fill(layer, slot, seed=slot)
    x = torch.randn(2, 3, 5, 5)
    want = []
    for slot in range(2):
        with ctx.use(slot):
            want.append(layer(x))
    layer.merge(0)
    torch.testing.assert_close(base(x), want[0], atol=1e-5, rtol=0)
    layer.switch(1)
    torch.testing.assert_close(base(x), want[1], atol=1e-5, rtol=0)
