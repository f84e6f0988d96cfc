"""NF4 against bitsandbytes (the reference implementation) and the naive formula."""

import pytest
import torch

from loratree.ops import nf4

bnb_f = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(1024, 1024), (37, 29), (64, 3), (5, 13), (1,), (300, 1000)]
"""(37, 29): 1073 values, not a multiple of 64 and odd; (300, 1000): several chunks."""


def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)
    return out[:n]


def _naive_nf4(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values by the formula, in float64, one block at a time."""
    flat = w.reshape(-1).double()
    code = nf4.NF4_CODE.double()
    codes, deq = [], []
    for s in range(0, flat.numel(), block):
        blk = flat[s:s + block]
        am = blk.abs().max()
        dist = (blk[:, None] / am - code[None, :]).abs()
        idx = dist.argmin(dim=1)  # first minimum: ties go to the lower code
        codes.append(idx)
        deq.append(code[idx] * am)
    return torch.cat(codes), torch.cat(deq)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double", [False, True])
def test_codes_and_values_equal_bitsandbytes(shape, double):
    torch.manual_seed(sum(shape) + double)
    w = torch.randn(shape) * 0.05
    ref_packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                           compress_statistics=double)
    ref_deq = bnb_f.dequantize_4bit(ref_packed, state)
    q = nf4.quantize(w, 64, double)
    assert torch.equal(q.packed, ref_packed.reshape(-1))  # bit-exact, padding nibble too
    if double:
        assert torch.equal(q.absmax, state.absmax)
        assert torch.equal(q.absmax2, state.state2.absmax)
        assert torch.equal(q.offset, state.offset)
    else:
        assert torch.equal(q.absmax, state.absmax)
    deq = nf4.dequantize(q)
    assert deq.shape == w.shape
    assert (deq - ref_deq).abs().max().item() <= 1e-6


def test_nf4_code_is_bitsandbytes_table():
    from bitsandbytes.functional import get_4bit_type

    assert torch.equal(nf4.NF4_CODE, get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.dynamic_code(), bnb_f.create_dynamic_map(signed=True))


@pytest.mark.parametrize("shape", [(37, 29), (8, 64)])
def test_codes_match_naive_formula(shape):
    torch.manual_seed(0)
    w = torch.randn(shape)
    codes, deq = _naive_nf4(w, 64)
    q = nf4.quantize(w, 64, double=False)
    assert torch.equal(_unpack(q.packed, w.numel()).long(), codes)
    torch.testing.assert_close(nf4.dequantize(q).double().reshape(-1), deq, atol=1e-6, rtol=0)


def test_round_trip_error_within_bitsandbytes_bound():
    torch.manual_seed(1)
    w = torch.randn(1024, 1024)
    for double in (False, True):
        err = (nf4.dequantize(nf4.quantize(w, 64, double)) - w).abs().mean().item()
        assert err <= 0.0733, (double, err)


def test_stored_size_with_double_quantization():
    q = nf4.quantize(torch.randn(1024, 1024), 64, double=True)
    assert q.bits_per_param() <= 4.13
    assert q.packed.dtype == torch.uint8 and q.absmax.dtype == torch.uint8
    single = nf4.quantize(torch.randn(1024, 1024), 64, double=False)
    assert single.bits_per_param() == pytest.approx(4.5)


def test_zero_block_and_bf16_input():
    w = torch.randn(4, 64)
    w[1] = 0.0
    q = nf4.quantize(w.bfloat16(), 64)
    deq = nf4.dequantize(q, torch.bfloat16)
    assert deq.dtype == torch.bfloat16
    assert torch.equal(deq[1], torch.zeros(64, dtype=torch.bfloat16))
    ref_packed, _ = bnb_f.quantize_4bit(w.bfloat16(), blocksize=64, quant_type="nf4")
    assert torch.equal(q.packed, ref_packed.reshape(-1))


def test_blockwise_8bit_matches_bitsandbytes():
    torch.manual_seed(2)
    x = torch.cat([torch.randn(5000), torch.zeros(256), torch.rand(4000) * 2 - 1])
    ref_q, state = bnb_f.quantize_blockwise(x, blocksize=256)
    q, absmax = nf4.quantize_blockwise(x, 256)
    assert torch.equal(q, ref_q)
    assert torch.equal(absmax, state.absmax)
    ref = bnb_f.dequantize_blockwise(ref_q, state)
    assert torch.equal(nf4.dequantize_blockwise(q, absmax, 256), ref)


def test_chunked_equals_unchunked(monkeypatch):
    torch.manual_seed(3)
    w = torch.randn(70, 1000)
    whole = nf4.quantize(w, 64)
    monkeypatch.setattr(nf4, "CHUNK", 1 << 10)
    parts = nf4.quantize(w, 64)
    assert torch.equal(whole.packed, parts.packed) and torch.equal(whole.absmax, parts.absmax)
    assert torch.equal(nf4.dequantize(whole), nf4.dequantize(parts))


def test_rejects_empty():
    with pytest.raises(ValueError, match="empty"):
        nf4.quantize(torch.empty(0, 4))
