import pytest
import torch

from loratree.ops import skinny


def _naive(x, w, b):
    """y[..., o] = sum_i x[..., i] w[o, i] + b[o], in float64."""
    y = torch.einsum("...i,oi->...o", x.double(), w.double())
    return y if b is None else y + b.double()


@pytest.mark.parametrize("shape", [(7,), (1, 7), (5, 7), (3, 1, 7), (2, 4, 7)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("fn", [skinny.rows_first, skinny.weight_first,
                                lambda x, w, b: skinny.blocked(x, w, b, block=4)])
def test_both_orientations_equal_the_naive_product(shape, bias, fn):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(*shape, generator=g), torch.randn(11, 7, generator=g)
    b = torch.randn(11, generator=g) if bias else None
    y = fn(x, w, b)
    assert y.shape == (*shape[:-1], 11)
    assert y.is_contiguous()
    torch.testing.assert_close(y.double(), _naive(x, w, b), atol=1e-5, rtol=0)


def test_weight_first_is_differentiable_like_linear():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, generator=g, requires_grad=True)
    w = torch.randn(5, 7, generator=g, requires_grad=True)
    skinny.weight_first(x, w).pow(2).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    (x @ w.t()).pow(2).sum().backward()
    torch.testing.assert_close(gx, x.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(gw, w.grad, atol=1e-5, rtol=0)
