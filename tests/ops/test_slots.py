import pytest
import torch

from loratree.ops import slots


def _reference(x, a, b, scales, index):
    """One token at a time: y_t = s[k] B[k] A[k] x_t, 0 for k = -1."""
    out = torch.zeros(x.shape[0], b[0].shape[0])
    for t, k in enumerate(index.tolist()):
        if k >= 0:
            out[t] = scales[k] * (b[k] @ (a[k] @ x[t]))
    return out


@pytest.mark.parametrize(
    "index",
    [[0, 1, -1, 0, 2, 2, 1], [1, 1, 1, 1], [-1, -1, -1], [2, -1, 2, 0], []],
)
def test_shrink_expand_match_per_token_loop(index):
    index = torch.tensor(index, dtype=torch.long)
    ranks = (2, 5, 3)  # slots of different ranks
    x = torch.randn(index.numel(), 6)
    a = [torch.randn(r, 6) for r in ranks]
    b = [torch.randn(4, r) for r in ranks]
    scales = [0.5, 2.0, 1.0]
    seg = slots.segment(index)
    h = slots.shrink(x, a, seg)
    y = slots.expand(torch.zeros(index.numel(), 4), h, b, scales, seg)
    torch.testing.assert_close(y, _reference(x, a, b, scales, index), atol=1e-5, rtol=0)


def test_segments_group_tokens_and_flag_uniform():
    seg = slots.segment(torch.tensor([1, 0, 1, -1, 0]))
    assert seg.slots == (0, 1) and seg.uniform is None
    assert seg.bounds == (0, 2, 4)
    assert sorted(seg.order[:2].tolist()) == [1, 4] and sorted(seg.order[2:].tolist()) == [0, 2]
    assert slots.segment(torch.tensor([3, 3, 3])).uniform == 3
    assert slots.segment(torch.tensor([-1, -1])).uniform == -1


def test_stacked_slots_equal_listed_slots():
    index = torch.tensor([0, 1, 1, -1, 0])
    x = torch.randn(5, 6)
    a, b = torch.randn(2, 3, 6), torch.randn(2, 4, 3)  # stacked (S, R, in), (S, out, R)
    seg = slots.segment(index)
    y_stacked = slots.expand(torch.zeros(5, 4), slots.shrink(x, a, seg), b, [1.0, 1.0], seg)
    h = slots.shrink(x, list(a), seg)
    y_listed = slots.expand(torch.zeros(5, 4), h, list(b), [1.0, 1.0], seg)
    torch.testing.assert_close(y_stacked, y_listed)


def test_map_segments_scatters_back_in_token_order():
    index = torch.tensor([1, -1, 0, 1])
    x = torch.arange(4.0).unsqueeze(1)
    out = slots.map_segments(x, slots.segment(index), lambda k, xs: xs * 10 + k)
    assert out.squeeze(1).tolist() == [1.0, 0.0, 20.0, 31.0]


@pytest.mark.parametrize("index", [
    [0, 1, -1, 0, 2, 2, 1],  # unsorted, uneven: gathered, with empty places
    [2, -1, 2, 0],
    [1, 0],  # one token per slot, not in slot order: gathered, no empty place
    [-1, 0, 0, 1, 1, 2, 2],  # sorted, as many per slot, after a base row: a view
    [0, 1, 2],
])
def test_grouped_add_and_kept_segments_match_per_token_loop(index):
    index = torch.tensor(index, dtype=torch.long)
    ranks = (2, 5, 3)  # slots of different ranks: the smaller ones padded with zeros
    x = torch.randn(index.numel(), 6)
    a = [torch.randn(r, 6) for r in ranks]
    b = [torch.randn(4, r) for r in ranks]
    scales = [0.5, 2.0, 1.0]
    used = sorted({int(k) for k in index if k >= 0})
    at, bt = slots.stack_factors(a, b, scales, used)
    assert at.shape == (len(used), max(ranks[k] for k in used), 6)
    assert bt.shape == (len(used), 4, max(ranks[k] for k in used))
    layout = slots.grouped_layout(index.tolist(), used)
    sorted_even = index.tolist() in ([-1, 0, 0, 1, 1, 2, 2], [0, 1, 2])
    assert (layout.gather is None) == sorted_even
    y0 = torch.randn(index.numel(), 4)
    got = slots.grouped_add(y0.clone(), x, at, bt, layout)
    torch.testing.assert_close(got, y0 + _reference(x, a, b, scales, index), atol=1e-5, rtol=0)
    # only some slots grouped: the others' tokens get nothing
    kept = used[:1]
    at, bt = slots.stack_factors(a, b, scales, kept)
    got = slots.grouped_add(y0.clone(), x, at, bt, slots.grouped_layout(index.tolist(), kept))
    masked = torch.where(torch.isin(index, torch.tensor(kept)), index, -1)
    torch.testing.assert_close(got, y0 + _reference(x, a, b, scales, masked), atol=1e-5, rtol=0)
    seg = slots.keep(slots.segment(index), kept)
    y = slots.expand(torch.zeros(index.numel(), 4), slots.shrink(x, a, seg), b, scales, seg)
    torch.testing.assert_close(y, _reference(x, a, b, scales, masked), atol=1e-5, rtol=0)


def test_grouped_add_keeps_a_slots_non_finite_factors_to_its_own_tokens():
    index = [1, 0, 1]  # uneven: slot 0 has an empty place, a zero row
    x = torch.randn(3, 6)
    a = [torch.full((2, 6), float("inf")), torch.randn(2, 6)]
    b = [torch.randn(4, 2), torch.randn(4, 2)]
    at, bt = slots.stack_factors(a, b, [1.0, 1.0], [0, 1])
    got = slots.grouped_add(torch.zeros(3, 4), x, at, bt, slots.grouped_layout(index, [0, 1]))
    assert not torch.isfinite(got[1]).any()
    want = _reference(x, a, b, [1.0, 1.0], torch.tensor([1, -1, 1]))
    torch.testing.assert_close(got[[0, 2]], want[[0, 2]], atol=1e-5, rtol=0)


def test_row_runs_cover_each_run_of_rows_once():
    assert slots.row_runs([2, 2, -1, 0, 0, 0, 2], 3, max_runs=4) == (
        (2, 0, 6), (0, 9, 18), (2, 18, 21))
    assert slots.row_runs([-1, -1], 5, max_runs=1) == ()
    assert slots.row_runs([0, 1, 0, 1], 2, max_runs=3) is None  # would need 4 runs


@pytest.mark.parametrize("ranks", [(2, 5, 3), (4, 0, 4), (3,)])
def test_grouped_branch_equals_each_slot_alone_in_value_and_gradient(ranks):
    """Training over rows sorted by slot (as many each): one bmm pair, padded ranks, a
    rank-0 slot, against the per-token loop; the factors' gradients against autograd
    through the loop."""
    g = torch.Generator().manual_seed(0)
    m, k = 5, len(ranks)
    x = torch.randn(k * m, 6, generator=g, requires_grad=True)
    a = [torch.randn(r, 6, generator=g).requires_grad_() for r in ranks]
    b = [torch.randn(4, r, generator=g).requires_grad_() for r in ranks]
    scales = [0.5, 2.0, 1.0][:k]
    index = torch.arange(k).repeat_interleave(m)
    upstream = torch.randn(k * m, 4, generator=g)

    out = slots.grouped_branch(x, a, b, scales, tuple(range(k)))
    grads = torch.autograd.grad((out * upstream).sum(), [x, *a, *b], allow_unused=True)
    ref = _reference(x, a, b, scales, index)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), [x, *a, *b], allow_unused=True)

    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    for got, want in zip(grads, ref_grads, strict=True):
        if want is None:  # a rank-0 factor has no entries
            assert got is None or got.numel() == 0
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
