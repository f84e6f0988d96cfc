"""The measured GEMM orientation: values of ``nn.Linear``, choices kept per shape, installed
and taken off again without a trace."""

import copy
import threading

import pytest
import torch
from torch import nn

from loratree.layers import NF4Linear
from loratree.serve.cpu import orientation
from loratree.serve.cpu.linears import OrientedForward, install_orientation, oriented_linears
from loratree.serve.cpu.orientation import BUCKETS, MAX_ROWS, OrientationTable


def _pair(bias: bool = True, table: OrientationTable | None = None
          ) -> tuple[nn.Linear, nn.Linear, OrientationTable]:
    torch.manual_seed(0)
    plain = nn.Linear(24, 40, bias=bias)
    fast = copy.deepcopy(plain)
    table = table or OrientationTable()
    install_orientation(fast, table)
    return plain, fast, table


@pytest.mark.parametrize("rows", [1, 3, 8, MAX_ROWS, MAX_ROWS + 1])
@pytest.mark.parametrize("bias", [False, True])
def test_an_oriented_linear_equals_linear_outside_autograd(rows, bias):
    plain, fast, table = _pair(bias)
    x = torch.randn(rows, 1, 24)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), plain(x), atol=1e-5, rtol=0)
    if rows <= MAX_ROWS:  # measured once, and kept
        bucket = {1: 1, 3: 4, 8: 8, MAX_ROWS: MAX_ROWS}[rows]
        name = table.choices()[(40, 24, bucket, torch.float32, bias, True)]
        assert name in ("rows_first", "weight_first")
    else:
        assert table.choices() == {}


def test_with_grad_it_is_linear_exactly():
    plain, fast, _ = _pair()
    x = torch.randn(4, 24, requires_grad=True)
    y = fast(x)
    assert torch.equal(y, plain(x))
    y.sum().backward()
    assert fast.weight.grad is not None and x.grad is not None


def test_install_touches_plain_linears_only_and_uninstall_leaves_no_trace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8, bias=False),
                          NF4Linear.from_linear(nn.Linear(64, 64)))
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    dicts = [set(vars(m)) for m in model.modules()]
    x = torch.randn(2, 8)
    with torch.no_grad():
        before = model[:3](x)
    uninstall = install_orientation(model, OrientationTable())
    assert install_orientation(model, OrientationTable())() == 0  # idempotent: none new
    assert oriented_linears(model) == [model[0], model[2]]
    assert type(model[0]) is nn.Linear and isinstance(model[0].forward, OrientedForward)
    assert "forward" not in vars(model[3])
    state = model.state_dict()
    assert state.keys() == keys.keys()
    assert all(torch.equal(state[k], v) for k, v in keys.items())
    with torch.no_grad():
        torch.testing.assert_close(model[:3](x), before, atol=1e-6, rtol=0)
    assert uninstall() == 2 and uninstall() == 0
    assert [type(m) for m in model.modules()] == types
    assert [set(vars(m)) for m in model.modules()] == dicts
    assert oriented_linears(model) == []
    with torch.no_grad():
        assert torch.equal(model[:3](x), before)


def test_a_choice_is_kept_per_thread_kind():
    _, fast, table = _pair()
    x = torch.randn(2, 1, 24)
    with torch.no_grad():
        fast(x)
        t = threading.Thread(target=lambda: torch.no_grad()(fast)(x))
        t.start()
        t.join()
    assert {(40, 24, 2, torch.float32, True, True),
            (40, 24, 2, torch.float32, True, False)} <= set(table.choices())


def test_warm_makes_every_bucket_choice_once_in_the_calling_thread():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 56), nn.Linear(56, 24), nn.Linear(24, 56))
    table = OrientationTable()
    install_orientation(model, table)
    made: list[int] = []

    def warm() -> None:
        made.append(table.warm(oriented_linears(model)))

    t = threading.Thread(target=warm)
    t.start()
    t.join()
    assert made == [2 * len(BUCKETS)]  # two shapes (the third layer shares the first's)
    keys = {(o, i, b, torch.float32, True, False) for o, i in ((56, 24), (24, 56))
            for b in BUCKETS}
    assert keys <= set(table.choices())
    t = threading.Thread(target=warm)
    t.start()
    t.join()
    assert made[1] == 0  # kept by the table
    x = torch.randn(3, 24)
    with torch.inference_mode():  # values stay those of nn.Linear
        torch.testing.assert_close(model(x), nn.functional.linear(
            nn.functional.linear(nn.functional.linear(x, model[0].weight, model[0].bias),
                                 model[1].weight, model[1].bias),
            model[2].weight, model[2].bias), atol=1e-5, rtol=0)


def test_a_wide_weight_also_times_the_blocked_product():
    torch.manual_seed(0)
    wide = nn.Linear(8, orientation._WIDE, bias=True)
    plain = copy.deepcopy(wide)
    table = OrientationTable()
    install_orientation(wide, table)
    x = torch.randn(4, 8)
    with torch.inference_mode():
        torch.testing.assert_close(wide(x), plain(x), atol=1e-5, rtol=0)
    assert orientation.kernels_for(wide) == ("rows_first", "weight_first", "blocked")
    assert orientation.kernels_for(nn.Linear(8, 64)) == ("rows_first", "weight_first")
    assert set(table.choices().values()) <= {"rows_first", "weight_first", "blocked"}
