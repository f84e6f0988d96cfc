import pytest
import torch

from loratree.ops.sampling import sample
from loratree.ops.token_mask import apply_token_mask, unpack_token_mask


def _naive(words, vocab):
    """The docstring's semantics, one token at a time (bits of the 32-bit word as unsigned)."""
    return [v < 32 * len(words) and (int(words[v // 32]) & 0xFFFFFFFF) >> (v % 32) & 1 == 1
            for v in range(vocab)]


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 64, 100, 140])
def test_unpack_matches_the_bit_by_bit_definition(vocab):
    g = torch.Generator().manual_seed(vocab)
    words = torch.randint(-(2**31), 2**31 - 1, ((min(vocab, 128) + 31) // 32,),
                          generator=g, dtype=torch.int64).to(torch.int32)
    words[0] |= torch.tensor(-(2**31), dtype=torch.int32)  # the sign bit is token 31
    got = unpack_token_mask(words, vocab)
    assert got.dtype == torch.bool and got.shape == (vocab,)
    assert got.tolist() == _naive(words, vocab)  # vocab 140: tokens past the words are off


def test_masked_logits_sample_only_allowed_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(70, generator=g) * 3
    allowed = torch.zeros(70, dtype=torch.bool)
    allowed[[2, 33, 69]] = True
    masked = apply_token_mask(logits, allowed)
    assert torch.equal(masked[allowed], logits[allowed])
    assert torch.isneginf(masked[~allowed]).all()
    assert logits.isfinite().all()  # the input is kept
    draws = {sample(masked, 1.5, 0, 1.0, g) for _ in range(200)}
    assert draws == {2, 33, 69}
    assert sample(masked) == max([2, 33, 69], key=lambda v: logits[v])
