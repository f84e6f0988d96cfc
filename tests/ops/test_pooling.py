"""Mean pooling over a padded batch's real tokens, against a per-row loop."""

import torch

from loratree.ops.pooling import mean_pool, unit_mean_pool


def test_mean_pool_counts_only_real_tokens_wherever_the_padding_is():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    lengths = [5, 2, 1]
    mask = (torch.arange(5)[None] < torch.tensor(lengths)[:, None]).long()
    mask[1] = torch.tensor([0, 0, 1, 0, 1])  # padding need not be at the end
    want = torch.stack([hidden[b][mask[b].bool()].mean(0) for b in range(3)]).float()
    got = mean_pool(hidden, mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    unit = unit_mean_pool(hidden.half(), mask)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(unit, torch.nn.functional.normalize(want, dim=-1), atol=2e-3,
                               rtol=0)
