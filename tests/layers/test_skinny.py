import copy

import pytest
import torch
from torch import nn

from loratree import surgery
from loratree.layers import NF4Linear
from loratree.layers.skinny import MAX_ROWS, SkinnyLinear, choices


def _pair(bias: bool = True) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(0)
    plain = nn.Linear(24, 40, bias=bias)
    fast = copy.deepcopy(plain)
    fast.__class__ = SkinnyLinear
    return plain, fast


@pytest.mark.parametrize("rows", [1, 3, 8, MAX_ROWS, MAX_ROWS + 1])
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_linear_equals_linear_outside_autograd(rows, bias):
    plain, fast = _pair(bias)
    x = torch.randn(rows, 1, 24)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), plain(x), atol=1e-5, rtol=0)
    if rows <= MAX_ROWS:  # measured once, and kept
        bucket = {1: 1, 3: 4, 8: 8, MAX_ROWS: MAX_ROWS}[rows]
        name = choices()[(40, 24, bucket, torch.float32, bias, True)]
        assert name in ("rows_first", "weight_first")


def test_with_grad_it_is_linear_exactly():
    plain, fast = _pair()
    x = torch.randn(4, 24, requires_grad=True)
    y = fast(x)
    assert torch.equal(y, plain(x))
    y.sum().backward()
    assert fast.weight.grad is not None and x.grad is not None


def test_skinny_linears_changes_plain_linears_only_and_keeps_the_state_dict():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8, bias=False),
                          NF4Linear.from_linear(nn.Linear(64, 64)))
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 8)
    with torch.no_grad():
        before = model[:3](x)
    assert surgery.skinny_linears(model) == 2
    assert surgery.skinny_linears(model) == 0  # idempotent
    assert type(model[0]) is SkinnyLinear and isinstance(model[0], nn.Linear)
    assert type(model[3]) is NF4Linear
    state = model.state_dict()
    assert state.keys() == keys.keys()
    assert all(torch.equal(state[k], v) for k, v in keys.items())
    with torch.no_grad():
        torch.testing.assert_close(model[:3](x), before, atol=1e-6, rtol=0)


def test_a_choice_is_kept_per_thread_kind():
    import threading

    _, fast = _pair()
    x = torch.randn(2, 1, 24)
    with torch.no_grad():
        fast(x)
        t = threading.Thread(target=lambda: torch.no_grad()(fast)(x))
        t.start()
        t.join()
    assert {(40, 24, 2, torch.float32, True, True),
            (40, 24, 2, torch.float32, True, False)} <= set(choices())


def test_warm_makes_every_bucket_choice_once_in_the_calling_thread():
    import threading

    from loratree.layers.skinny import BUCKETS, warm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 56), nn.Linear(56, 24), nn.Linear(24, 56))
    surgery.skinny_linears(model)
    made: list[int] = []
    t = threading.Thread(target=lambda: made.append(warm(model.modules())))
    t.start()
    t.join()
    assert made == [2 * len(BUCKETS)]  # two shapes (the third layer shares the first's)
    keys = {(o, i, b, torch.float32, True, False) for o, i in ((56, 24), (24, 56))
            for b in BUCKETS}
    assert keys <= set(choices())
    t = threading.Thread(target=lambda: made.append(warm(model.modules())))
    t.start()
    t.join()
    assert made[1] == 0  # kept for the process
    x = torch.randn(3, 24)
    with torch.inference_mode():  # values stay those of nn.Linear
        torch.testing.assert_close(model(x), nn.functional.linear(
            nn.functional.linear(nn.functional.linear(x, model[0].weight, model[0].bias),
                                 model[1].weight, model[1].bias),
            model[2].weight, model[2].bias), atol=1e-5, rtol=0)


def test_a_wide_weight_also_times_the_blocked_product():
    from loratree.layers import skinny as layer_skinny

    torch.manual_seed(0)
    wide = nn.Linear(8, layer_skinny._WIDE, bias=True)
    plain = copy.deepcopy(wide)
    wide.__class__ = SkinnyLinear
    times: dict = {}
    real = layer_skinny._measure

    def spy(items, flush=None):
        made = real(items, flush)
        times.update(made)
        return made

    layer_skinny._measure = spy
    try:
        x = torch.randn(4, 8)
        with torch.inference_mode():
            torch.testing.assert_close(wide(x), plain(x), atol=1e-5, rtol=0)
    finally:
        layer_skinny._measure = real
    assert layer_skinny._kernels(wide) == ("rows_first", "weight_first", "blocked")
    assert layer_skinny._kernels(nn.Linear(8, 64)) == ("rows_first", "weight_first")
    assert set(times.values()) <= {"rows_first", "weight_first", "blocked"}
