"""NF4Linear against bitsandbytes' dequantized weight, and LoRA slots on top of it."""

import pytest
import torch
from torch import nn

from loratree.errors import QuantizedBaseError
from loratree.layers import LoraLinear, NF4Linear, SlotContext, SlotSpec

bnb_f = pytest.importorskip("bitsandbytes.functional")


def _reference_weight(w: torch.Tensor, double: bool) -> torch.Tensor:
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                        compress_statistics=double)
    return bnb_f.dequantize_4bit(packed, state)


@pytest.mark.parametrize("double", [False, True])
def test_forward_and_input_grad_match_reference(double):
    torch.manual_seed(0)
    # rows a multiple of the block: bitsandbytes 0.50.2's CPU kernel mis-dequantizes blocks
    # that span rows of even length (e.g. 40 x 96); ops/test_nf4 checks those by formula
    linear = nn.Linear(128, 40)
    layer = NF4Linear.from_linear(linear, double=double)
    w_ref = _reference_weight(linear.weight.detach(), double)
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = layer(x)
    ref = x @ w_ref.t() + linear.bias.detach()
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, g @ w_ref, atol=1e-5, rtol=0)


def test_buffers_not_parameters_and_size():
    layer = NF4Linear.from_linear(nn.Linear(1024, 1024, bias=False))
    assert list(layer.parameters()) == []
    stored = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert 8 * stored / (1024 * 1024) <= 4.13
    assert set(layer.state_dict()) == {"weight_nf4", "weight_absmax", "weight_absmax2",
                                       "weight_offset"}


def test_graph_saves_no_float_weight():
    torch.manual_seed(1)
    layer = LoraLinear(NF4Linear.from_linear(nn.Linear(128, 64)), SlotContext())
    layer.add_slot(SlotSpec(4, 8.0))
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    x = torch.randn(2, 128)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert layer.lora_b[0].grad is not None and layer.lora_b[0].grad.abs().sum() > 0
    assert (64, 128) not in saved and (128, 64) not in saved, saved


def test_lora_slots_on_nf4_equal_lora_on_dequantized_float():
    """One adapter, two adapters and per-token slots: the same as over the float weight."""
    torch.manual_seed(2)
    nf = NF4Linear.from_linear(nn.Linear(64, 48))
    plain = nn.Linear(64, 48)
    with torch.no_grad():
        plain.weight.copy_(nf.dequantize())
        plain.bias.copy_(nf.bias)
    ctx_q, ctx_f = SlotContext(), SlotContext()
    q, f = LoraLinear(nf, ctx_q), LoraLinear(plain, ctx_f)
    for rank in (4, 2):
        for layer in (q, f):
            layer.add_slot(SlotSpec(rank, 2.0 * rank))
    with torch.no_grad():
        for slot in range(2):
            for pq, pf in ((q.lora_a[slot], f.lora_a[slot]), (q.lora_b[slot], f.lora_b[slot])):
                pq.copy_(torch.randn_like(pq))
                pf.copy_(pq)
    x = torch.randn(5, 3, 64)
    for slot in (0, 1, -1):
        ctx_q.active = ctx_f.active = slot
        torch.testing.assert_close(q(x), f(x), atol=1e-5, rtol=0)
    index = torch.tensor([0, 1, -1, 1, 0])
    with ctx_q.use(index), ctx_f.use(index):
        torch.testing.assert_close(q(x), f(x), atol=1e-5, rtol=0)


def test_merge_into_nf4_is_refused_with_a_typed_error():
    layer = LoraLinear(NF4Linear.from_linear(nn.Linear(64, 64)), SlotContext())
    layer.add_slot(SlotSpec(2, 4.0))
    with pytest.raises(QuantizedBaseError, match="export"):
        layer.merge(0)
    assert layer.merged is None


def test_bf16_compute():
    torch.manual_seed(3)
    linear = nn.Linear(64, 32)
    layer = NF4Linear.from_linear(linear)
    x = torch.randn(4, 64)
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), atol=0.05, rtol=0.02)
