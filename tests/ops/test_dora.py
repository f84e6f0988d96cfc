"""DoRA's ops against the formula written out loop by loop in float64."""

import torch

from loratree.ops import dora


def _naive_norm(w, a, b, s):
    full = (w.double() + s * b.double() @ a.double()).detach()
    return torch.tensor([sum(float(v) ** 2 for v in row) ** 0.5 for row in full],
                        dtype=torch.float64)


def _naive_apply(x, w, a, b, s, m, bias):
    full = w.double() + s * b.double() @ a.double()
    n = _naive_norm(w, a, b, s)
    unit = full / n[:, None]  # each output row a unit vector
    return x.double() @ (m.double()[:, None] * unit).t() + bias.double()


def _case():
    g = torch.Generator().manual_seed(3)
    x, w, bias = (torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g),
                  torch.randn(3, generator=g))
    a, b, m = torch.randn(2, 7, generator=g), torch.randn(3, 2, generator=g), torch.rand(
        3, generator=g) + 0.5
    return x, w, bias, a, b, m, 0.75


def test_weight_norm_is_the_row_norm_of_the_adapted_weight_and_detached():
    _, w, _, a, b, _, s = _case()
    a.requires_grad_(True)
    n = dora.weight_norm(w, a, b, s)
    torch.testing.assert_close(n.double(), _naive_norm(w, a, b, s), atol=1e-6, rtol=0)
    assert not n.requires_grad


def test_apply_and_rescale_match_the_naive_formula():
    x, w, bias, a, b, m, s = _case()
    ref = _naive_apply(x, w, a, b, s, m, bias)
    torch.testing.assert_close(dora.apply(x, w, a, b, s, m, bias).double(), ref, atol=1e-5,
                               rtol=0)
    torch.testing.assert_close(dora.apply(x, w, a, b, s, m).double(), ref - bias.double(),
                               atol=1e-5, rtol=0)
    plain = x @ w.t() + bias + s * (x @ a.t()) @ b.t()
    g = dora.factor(m, dora.weight_norm(w, a, b, s))
    y = dora.rescale(plain, g, bias)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(dora.unrescale(y, g, bias), plain, atol=1e-5, rtol=0)


def test_dropout_delta_is_peft_arrangement_and_equals_rescale_without_dropout():
    x, w, bias, a, b, m, s = _case()
    g = dora.factor(m, dora.weight_norm(w, a, b, s))
    base = x @ w.t() + bias
    lora = s * (x @ a.t()) @ b.t()
    y = base + dora.dropout_delta(x @ w.t(), lora, g)
    torch.testing.assert_close(y.double(), _naive_apply(x, w, a, b, s, m, bias), atol=1e-5,
                               rtol=0)


def test_gradient_reaches_m_a_b_not_the_norm():
    x, w, bias, a, b, m, s = _case()
    for t in (a, b, m):
        t.requires_grad_(True)
    dora.apply(x, w, a, b, s, m, bias).sum().backward()
    # d/dm of sum(y) with n constant: sum over tokens of (W + sBA) x / n
    full = (w + s * b @ a).detach()
    n = dora.weight_norm(w, a, b, s)
    want = (x @ full.t()).sum(0) / n
    torch.testing.assert_close(m.grad, want, atol=1e-5, rtol=0)
    assert a.grad is not None and b.grad is not None


def test_merged_then_unmerged_restores_the_weight():
    x, w, bias, a, b, m, s = _case()
    merged, n = dora.merged(w, a, b, s, m)
    y = x.double() @ merged.double().t() + bias.double()
    torch.testing.assert_close(y, _naive_apply(x, w, a, b, s, m, bias), atol=1e-5, rtol=0)
    torch.testing.assert_close(dora.unmerged(merged, a, b, s, m, n), w, atol=1e-5, rtol=0)
