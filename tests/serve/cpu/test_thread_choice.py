"""The engine's choice of MKL threads for decode steps, made by timing both settings."""

import contextlib

import pytest

from loratree.serve.cpu.thread_choice import DecodeThreads


class FakeHost:
    """A clock that advances by a step's cost under the MKL setting in force."""

    def __init__(self, one: float, every: float) -> None:
        self.now, self.cost, self.setting = 0.0, {"one": one, "all": every}, "all"
        self.settings: list[str] = []

    def clock(self) -> float:
        return self.now

    @contextlib.contextmanager
    def threads(self, n: int):
        assert n == 1
        self.setting = "one"
        try:
            yield
        finally:
            self.setting = "all"

    def run(self, choice: DecodeThreads, key: object) -> None:
        with choice.step(key):
            self.settings.append(self.setting)
            self.now += self.cost[self.setting]


def _chooser(host: FakeHost, pairs: int = 4) -> DecodeThreads:
    choice = DecodeThreads(pairs, clock=host.clock, threads=host.threads)
    choice.chosen = None  # measure even where torch has no MKL (the fake sets the count)
    return choice


@pytest.mark.parametrize(("one", "every", "want"), [(0.045, 0.073, "one"),
                                                    (0.165, 0.100, "all")])
def test_keeps_the_setting_that_measured_faster(one, every, want):
    host = FakeHost(one, every)
    choice = _chooser(host)
    for _ in range(8):
        assert choice.chosen is None
        host.run(choice, 4)
    assert choice.chosen == want
    # each pair ran both settings, the order alternating between pairs
    assert host.settings == ["all", "one", "one", "all", "all", "one", "one", "all"]
    host.settings.clear()
    for _ in range(3):
        host.run(choice, 4)
    assert host.settings == [want] * 3


def test_a_pair_whose_rows_changed_is_not_counted():
    host = FakeHost(0.045, 0.073)
    choice = _chooser(host, pairs=2)
    host.run(choice, 4)
    host.run(choice, 3)  # rows left between the two steps: the pair is void, a new one opens
    host.run(choice, 3)
    assert choice._ratios == [pytest.approx(0.045 / 0.073)] and choice.chosen is None
    host.run(choice, 3)
    host.run(choice, 3)
    assert choice.chosen == "one"
