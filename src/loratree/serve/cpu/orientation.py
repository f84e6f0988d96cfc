"""Which GEMM orientation of ``ops.skinny`` a linear over few rows (a decode step on the
CPU) runs: timed once per shape, kept in an ``OrientationTable``.

The choice is made once per (out, in, rows rounded up to a power of two, dtype, bias,
thread kind) on the first such call, by timing the kernels on that call's own operands
(for a wide weight, such as an LM head, also its product in row blocks). A decode step
streams every weight from memory once, and the faster orientation with the weight in
cache is not always the faster one from memory, so each timed call runs after a read of a
buffer twice the last-level cache. The thread kind (main or other) is part of the key
since the engine's own thread and the main thread hold different OpenMP pools.
``OrientationTable.warm`` makes the choices ahead of use (a server, before its first
request).
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from loratree.ops import skinny

__all__ = ["BUCKETS", "KERNELS", "MAX_ROWS", "KernelName", "OrientationTable", "ShapeKey",
           "shape_key"]

logger = logging.getLogger(__name__)

MAX_ROWS = 32
"""Inputs of more rows than this always take ``F.linear`` (prefill, training batches)."""
BUCKETS = tuple(1 << i for i in range(MAX_ROWS.bit_length()))
"""The row counts a decode step can round up to: 1, 2, 4, ..., ``MAX_ROWS``."""
_TRIALS = 5
_DEFAULT_LLC = 32 << 20

KernelName = Literal["rows_first", "weight_first", "blocked"]
Kernel = Callable[[Tensor, Tensor, Tensor | None], Tensor]
KERNELS: dict[KernelName, Kernel] = {"rows_first": skinny.rows_first,
                                     "weight_first": skinny.weight_first,
                                     "blocked": skinny.blocked}
_WIDE = 8192
"""``blocked`` is timed only for weights of at least this many rows (an LM head)."""


class ShapeKey(NamedTuple):
    """What a choice is kept for."""

    out_features: int
    in_features: int
    rows: int
    """The row count rounded up to a power of two."""
    dtype: torch.dtype
    bias: bool
    main_thread: bool


def shape_key(linear: nn.Linear, rows: int) -> ShapeKey:
    bucket = 1 << (rows - 1).bit_length()  # 1, 2, 4, ..., MAX_ROWS
    return ShapeKey(linear.out_features, linear.in_features, bucket, linear.weight.dtype,
                    linear.bias is not None,
                    threading.current_thread() is threading.main_thread())


class OrientationTable:
    """The kernel chosen per ``ShapeKey``, measured on first need and kept."""

    def __init__(self) -> None:
        self._chosen: dict[ShapeKey, KernelName] = {}

    def choices(self) -> dict[ShapeKey, KernelName]:
        """Every choice made so far."""
        return dict(self._chosen)

    def choose(self, linear: nn.Linear, x: Tensor, rows: int) -> KernelName:
        """The kernel for ``linear`` over ``x`` (``rows`` rows), measured now if new."""
        key = shape_key(linear, rows)
        name = self._chosen.get(key)
        if name is None:
            name = self.measure([(key, linear, x)])[key]
        return name

    @torch.inference_mode()
    def warm(self, linears: Iterable[nn.Linear], rows: Sequence[int] = BUCKETS) -> int:
        """Make, now and in the calling thread, the choice for each of ``linears`` (on the
        CPU) and each of ``rows`` not measured yet; how many were made. A server calls this
        before it takes requests, so no request waits for a measurement (each costs cache
        flushes). Layers of one shape share a choice; one flush serves one timed call of
        every shape."""
        pending: dict[ShapeKey, tuple[nn.Linear, int]] = {}
        for m in linears:
            if m.weight.device.type == "cpu":
                for r in rows:
                    key = shape_key(m, r)
                    if key not in self._chosen:
                        pending.setdefault(key, (m, r))
        if not pending:
            return 0
        started = time.perf_counter()
        flush = _flush_buffer()
        for r in sorted({r for _, r in pending.values()}):  # one weight read per flush
            self.measure([(key, m, torch.randn(r, m.in_features, dtype=m.weight.dtype))
                          for key, (m, rr) in pending.items() if rr == r], flush)
        logger.info("linear orientations: %d choices measured in %.1f s", len(pending),
                    time.perf_counter() - started)
        return len(pending)

    def measure(self, items: list[tuple[ShapeKey, nn.Linear, Tensor]],
                flush: Tensor | None = None) -> dict[ShapeKey, KernelName]:
        """Time the kernels for each (key, layer, input) of ``items`` (interleaved, after a
        warm-up each, every timed call after a cache flush: items have distinct weights, so
        each call reads its weight from memory) and keep the faster by median."""
        times = _time_kernels(items, _flush_buffer() if flush is None else flush)
        made: dict[ShapeKey, KernelName] = {}
        for key, m, x in items:
            medians = {name: statistics.median(t) for name, t in times[key].items()}
            made[key] = self._chosen[key] = min(medians, key=medians.__getitem__)
            logger.debug("linear %dx%d over %d rows: %s (%s)", m.out_features,
                         m.in_features, x.numel() // m.in_features, made[key],
                         ", ".join(f"{n} {1e6 * t:.0f} us" for n, t in medians.items()))
        return made


def _time_kernels(items: list[tuple[ShapeKey, nn.Linear, Tensor]],
                  flush: Tensor) -> dict[ShapeKey, dict[KernelName, list[float]]]:
    times = {key: {name: [] for name in kernels_for(m)} for key, m, _ in items}
    for trial in range(_TRIALS + 1):
        for name, kernel in KERNELS.items():
            flush.sum()  # the weights out of cache, as in a decode step
            for key, m, x in items:
                if name not in times[key]:
                    continue
                t0 = time.perf_counter()
                kernel(x, m.weight, m.bias)
                if trial:
                    times[key][name].append(time.perf_counter() - t0)
    return times


def kernels_for(m: nn.Linear) -> tuple[KernelName, ...]:
    """The kernels timed for ``m``: ``blocked`` only for a wide weight."""
    if m.out_features >= _WIDE:
        return tuple(KERNELS)
    return ("rows_first", "weight_first")


def _flush_buffer() -> Tensor:
    """A buffer twice the last-level cache: reading it evicts the weights."""
    return torch.ones(2 * _last_level_cache() // 4)  # float32


@cache
def _last_level_cache() -> int:
    """Bytes of the largest CPU cache sysfs reports (32 MiB when it reports none)."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        try:
            sizes.append(int(text[:-1]) << {"K": 10, "M": 20}[text[-1]])
        except (KeyError, ValueError, IndexError):
            continue
    return min(max(sizes, default=_DEFAULT_LLC), 256 << 20)
