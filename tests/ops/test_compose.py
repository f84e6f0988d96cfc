"""ops.compose: rank concatenation equals the sum of the adapters' updates."""

import pytest
import torch

from loratree.ops import compose


def _factors(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(a, generator=g), torch.randn(b, generator=g), s) for a, b, s in shapes]


def test_concat_equals_the_sum_of_scaled_products():
    factors = _factors([((2, 16), (12, 2), 2.0), ((5, 16), (12, 5), 0.3), ((1, 16), (12, 1), 7)])
    a, b = compose.concat(factors)
    assert a.shape == (8, 16) and b.shape == (12, 8)
    want = sum(s * bi.double() @ ai.double() for ai, bi, s in factors)
    torch.testing.assert_close(b.double() @ a.double(), want, atol=1e-5, rtol=1e-6)


def test_weighted_sum_and_conv_shapes():
    factors = _factors([((3, 4, 3, 3), (6, 3, 1, 1), 1.5), ((2, 4, 3, 3), (6, 2, 1, 1), 0.5)])
    a, b = compose.concat(factors, weights=[0.25, -1.0])
    assert a.shape == (5, 4, 3, 3) and b.shape == (6, 5, 1, 1)
    flat = b.flatten(1).double() @ a.flatten(1).double()
    want = sum(w * s * bi.flatten(1).double() @ ai.flatten(1).double()
               for (ai, bi, s), w in zip(factors, [0.25, -1.0], strict=True))
    torch.testing.assert_close(flat, want, atol=1e-5, rtol=1e-6)


def test_mismatched_layers_are_refused():
    with pytest.raises(ValueError, match="different layers"):
        compose.concat(_factors([((2, 16), (12, 2), 1.0), ((2, 8), (12, 2), 1.0)]))
    with pytest.raises(ValueError, match="share a rank"):
        compose.concat(_factors([((2, 16), (12, 3), 1.0)]))
    with pytest.raises(ValueError, match="at least one"):
        compose.concat([])
