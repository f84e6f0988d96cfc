import pytest
import torch

from loratree.ops import lora


def _naive_delta(a, b, s):
    out, r = b.shape
    _, n_in = a.shape
    d = torch.zeros(out, n_in, dtype=torch.float64)
    for k in range(r):
        d += torch.outer(b[:, k].double(), a[k].double())
    return d * s


@pytest.mark.parametrize("rslora", [False, True])
def test_scale(rslora):
    assert lora.scale(16, 4, rslora) == pytest.approx(16 / 2 if rslora else 16 / 4)


def test_delta_apply_merge_unmerge_match_naive_formula():
    x, w, bias = torch.randn(5, 7), torch.randn(3, 7), torch.randn(3)
    a, b, s = torch.randn(2, 7), torch.randn(3, 2), 0.5
    d = _naive_delta(a, b, s)
    torch.testing.assert_close(lora.delta(a, b, s).double(), d, atol=1e-6, rtol=0)
    y_naive = x.double() @ (w.double() + d).t() + bias.double()
    torch.testing.assert_close(lora.apply(x, w, a, b, s, bias).double(), y_naive, atol=1e-5, rtol=0)
    branch = lora.branch(x, a, b, s).double()
    torch.testing.assert_close(branch, x.double() @ d.t(), atol=1e-5, rtol=0)
    merged = w.clone()
    lora.merge_(merged, a, b, s)
    torch.testing.assert_close(merged.double(), w.double() + d, atol=1e-6, rtol=0)
    lora.unmerge_(merged, a, b, s)
    assert torch.allclose(merged, w, atol=1e-6, rtol=0)


def test_merge_writes_through_a_transposed_view():
    """A layer passes its weight as an (out, in) view (Conv1D's (in, out) transposed)."""
    w_in_out = torch.randn(7, 3)
    a, b = torch.randn(2, 7), torch.randn(3, 2)
    want = w_in_out + lora.delta(a, b, 0.5).t()
    lora.merge_(w_in_out.t(), a, b, 0.5)
    torch.testing.assert_close(w_in_out, want, atol=1e-6, rtol=0)


def test_switch_equals_merging_the_new_adapter():
    w = torch.randn(4, 6)
    old = (torch.randn(2, 6), torch.randn(4, 2), 2.0)
    new = (torch.randn(3, 6), torch.randn(4, 3), 0.5)
    want = w.clone()
    lora.merge_(want, *new)
    for new_first in (True, False):
        switched = w.clone()
        lora.merge_(switched, *old)
        lora.switch_(switched, old, new, new_first=new_first)
        torch.testing.assert_close(switched, want, atol=1e-5, rtol=0)


def test_switch_is_one_product_of_concatenated_factors(monkeypatch):
    """The difference comes from ops.compose.concat: one matmul of rank r_new + r_old."""
    calls = []
    real = lora.compose.concat
    monkeypatch.setattr(lora.compose, "concat",
                        lambda factors, weights=None: calls.append(
                            ([f[0].shape[0] for f in factors], weights))
                        or real(factors, weights))
    w = torch.randn(4, 6)
    lora.switch_(w, (torch.randn(2, 6), torch.randn(4, 2), 1.0),
                 (torch.randn(3, 6), torch.randn(4, 3), 1.0))
    assert calls == [([3, 2], [1.0, -1.0])]


@pytest.mark.parametrize("op", ["merge", "switch"])
def test_a_non_finite_update_is_refused_and_the_weight_kept(op):
    w = torch.randn(4, 6)
    before = w.clone()
    good = (torch.randn(2, 6), torch.randn(4, 2), 1.0)
    bad = (torch.full((2, 6), float("nan")), torch.randn(4, 2), 1.0)
    with pytest.raises(FloatingPointError):
        if op == "merge":
            lora.merge_(w, *bad)
        else:
            lora.switch_(w, good, bad)
    assert torch.equal(w, before)


def test_a_low_precision_weight_is_added_in_fp32_and_rounded_once():
    w = torch.randn(8, 16).to(torch.bfloat16)
    a, b = torch.randn(2, 16), torch.randn(8, 2) * 1e-3
    want = (w.float() + lora.delta(a, b, 1.0)).to(torch.bfloat16)
    lora.merge_(w, a, b, 1.0)
    assert torch.equal(w, want)


def test_switching_1000_times_stays_within_1e_5_of_max_w():
    """Back and forth between two adapters, the pair always in the same order (as
    ``LoraModule.switch`` puts the lower slot first): the weight ends within 1e-5 of
    max|W| of the weight with the last adapter merged once."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(64, 48, generator=g)
    x = (torch.randn(4, 48, generator=g), torch.randn(64, 4, generator=g) * 0.1, 2.0)
    y = (torch.randn(8, 48, generator=g), torch.randn(64, 8, generator=g) * 0.1, 0.5)
    w = w0.clone()
    lora.merge_(w, *x)
    for i in range(1000):  # x -> y -> x -> ...: an even count ends on x
        if i % 2 == 0:
            lora.switch_(w, x, y, new_first=False)  # x first
        else:
            lora.switch_(w, y, x, new_first=True)
    want = w0.clone()
    lora.merge_(want, *x)
    drift = ((w - want).abs().max() / w0.abs().max()).item()
    assert drift <= 1e-5, drift


@pytest.mark.parametrize(("a_shape", "b_shape"), [
    ((2, 7), (3, 2)),  # Linear: a (r, in), b (out, r); Embedding the same with in = vocab
    ((2, 3, 3, 3), (4, 2, 1, 1)),  # Conv2d: a (r, in, kh, kw), b (out, r, 1, 1)
    ((2, 3, 5), (4, 2, 1)),  # Conv1d
])
def test_grow_keeps_the_update_and_appends_rows_and_zero_columns(a_shape, b_shape):
    a, b = torch.randn(a_shape), torch.randn(b_shape)
    new_a = torch.randn((3, *a_shape[1:]))
    a2, b2 = lora.grow(a, b, new_a)
    assert a2.shape == (5, *a_shape[1:]) and b2.shape == (b_shape[0], 5, *b_shape[2:])
    assert torch.equal(a2[:2], a) and torch.equal(a2[2:], new_a)
    assert torch.equal(b2[:, :2], b) and not b2[:, 2:].any()
    want = _naive_delta(a.flatten(1), b.flatten(1), 0.5)
    got = _naive_delta(a2.flatten(1), b2.flatten(1), 0.5)
    assert torch.equal(got, want)  # the zero columns add exact zeros
    torch.testing.assert_close(lora.delta(a2.flatten(1), b2.flatten(1), 0.5).double(), want,
                               atol=1e-6, rtol=0)


def test_grow_refuses_rows_of_another_shape():
    with pytest.raises(ValueError, match="cannot grow"):
        lora.grow(torch.randn(2, 7), torch.randn(3, 2), torch.randn(2, 6))


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize(("rank", "new_rank"), [(1, 2), (4, 8), (4, 16), (8, 24)])
def test_grown_alpha_keeps_the_scale(rslora, rank, new_rank):
    alpha = lora.grown_alpha(16.0, rank, new_rank, rslora)
    assert lora.scale(alpha, new_rank, rslora) == pytest.approx(lora.scale(16.0, rank, rslora),
                                                                rel=1e-12)
