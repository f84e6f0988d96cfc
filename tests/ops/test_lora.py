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
    merged = lora.merge(w, a, b, s)
    torch.testing.assert_close(merged.double(), w.double() + d, atol=1e-6, rtol=0)
    assert torch.allclose(lora.unmerge(merged, a, b, s), w, atol=1e-6, rtol=0)


def test_switch_equals_merging_the_new_adapter():
    w = torch.randn(4, 6)
    old = (torch.randn(2, 6), torch.randn(4, 2), 2.0)
    new = (torch.randn(3, 6), torch.randn(4, 3), 0.5)
    switched = lora.switch(lora.merge(w, *old), old, new)
    torch.testing.assert_close(switched, lora.merge(w, *new), atol=1e-5, rtol=0)


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
