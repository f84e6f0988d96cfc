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
