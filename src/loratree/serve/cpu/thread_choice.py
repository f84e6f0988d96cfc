"""Whether the engine's decode steps run MKL on one thread or on all: chosen by timing.

Which is faster depends on the machine, not on the code: the same decode step has run
markedly faster on one thread on one 2-core host and markedly slower on another. A fixed
choice is therefore wrong somewhere, so the engine measures: its first decode steps
alternate the two settings in pairs of steps with the same rows (one position apart, so
the same cost up to one cache entry; the order inside a pair alternates too), and after
``pairs`` pairs it keeps one thread only where its median paired ratio is below
``ONE_WINS`` (step times on a shared machine vary by 10-15%: a near tie keeps MKL's
default)."""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum

from loratree.serve.cpu import mkl

__all__ = ["DecodeThreads", "Setting"]

logger = logging.getLogger(__name__)



class Setting(StrEnum):
    """MKL's thread count for a decode step: its own (all) or one."""

    ALL = "all"
    ONE = "one"


ALL, ONE = Setting.ALL, Setting.ONE
ONE_WINS = 0.9
"""One thread is kept only when it takes under this share of all threads' time."""


class DecodeThreads:
    """Times decode steps under both MKL settings, then keeps the faster.

    ``chosen`` is None while measuring, then ``"all"`` (MKL's own thread count) or
    ``"one"``. ``clock`` is injectable for tests; ``threads`` is the context manager that
    sets MKL's thread count for the calling thread (``serve.cpu.mkl.threads``)."""

    def __init__(self, pairs: int = 8, *, clock: Callable[[], float] = time.perf_counter,
                 threads: Callable[[int], contextlib.AbstractContextManager] = mkl.threads
                 ) -> None:
        self.pairs, self._clock, self._threads = pairs, clock, threads
        self.chosen: Setting | None = None if mkl.available() else ALL
        self._ratios: list[float] = []
        """Per finished pair: the one-thread step's time over the all-threads step's."""
        self._open: tuple[object, Setting, float] | None = None
        """The first step of a pair: its key, setting and seconds."""

    @contextmanager
    def step(self, key: object) -> Iterator[None]:
        """Run one decode step; ``key`` names what makes steps comparable (their rows)."""
        if self.chosen is not None:
            with self._setting(self.chosen):
                yield
            return
        if self._open is not None and self._open[0] != key:
            self._open = None  # the rows changed: this pair is void
        setting = self._next_setting()
        started = self._clock()
        with self._setting(setting):
            yield
        self._record(key, setting, self._clock() - started)

    def _next_setting(self) -> Setting:
        if self._open is not None:
            return ONE if self._open[1] == ALL else ALL
        return ALL if len(self._ratios) % 2 == 0 else ONE

    def _setting(self, setting: Setting) -> contextlib.AbstractContextManager:
        return self._threads(1) if setting == ONE else contextlib.nullcontext()

    def _record(self, key: object, setting: Setting, seconds: float) -> None:
        if self._open is None:
            self._open = (key, setting, seconds)
            return
        first = self._open
        self._open = None
        one, every = (seconds, first[2]) if setting == ONE else (first[2], seconds)
        self._ratios.append(one / max(every, 1e-9))
        if len(self._ratios) >= self.pairs:
            ratio = statistics.median(self._ratios)
            self.chosen = ONE if ratio < ONE_WINS else ALL
            logger.info("decode steps run MKL on %s thread(s): one thread takes %.2fx the "
                        "time of all (median of %d paired steps)", self.chosen, ratio,
                        len(self._ratios))
