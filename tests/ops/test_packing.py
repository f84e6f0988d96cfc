"""The packed sequence's mask against the rule written out entry by entry."""

import torch

from loratree.ops.packing import additive, packed_mask


def test_packed_mask_equals_the_rule_entry_by_entry():
    g = torch.Generator().manual_seed(0)
    kv_owner = torch.randint(-1, 4, (23,), generator=g)
    kv_pos = torch.randint(-1, 9, (23,), generator=g)
    q_owner = torch.randint(0, 4, (11,), generator=g)
    q_pos = torch.randint(0, 9, (11,), generator=g)
    got = packed_mask(q_owner, q_pos, kv_owner, kv_pos)
    assert got.shape == (11, 23) and got.dtype == torch.bool
    for t in range(11):
        for s in range(23):
            want = (int(kv_owner[s]) >= 0 and int(kv_owner[s]) == int(q_owner[t])
                    and int(kv_pos[s]) <= int(q_pos[t]))
            assert bool(got[t, s]) is want, (t, s)


def test_additive_mask_is_zero_where_seen_and_lowest_elsewhere():
    mask = torch.tensor([[True, False], [False, True]])
    out = additive(mask, torch.float32)
    assert out.dtype == torch.float32
    assert out.tolist() == [[0.0, torch.finfo(torch.float32).min],
                            [torch.finfo(torch.float32).min, 0.0]]


def test_windowed_keeps_the_last_window_entries_of_each_query():
    from loratree.ops.packing import windowed

    torch.manual_seed(0)
    mask = torch.rand(6, 9) > 0.3
    q_seq, kv_seq = torch.randint(0, 12, (6,)), torch.randint(0, 12, (9,))
    out = windowed(mask, q_seq, kv_seq, 3)
    for t in range(6):
        for s in range(9):
            want = bool(mask[t, s]) and q_seq[t] - 3 < kv_seq[s]
            assert bool(out[t, s]) == want
