"""``SkinnyLinear``: an ``nn.Linear`` that, for inputs of few rows outside autograd (a
decode step on the CPU), runs whichever GEMM orientation of ``ops.skinny`` it measured to
be faster for that shape (for a wide weight, such as an LM head, also its product in row
blocks).

The choice is made once per (out, in, rows rounded up to a power of two, dtype, bias,
thread kind) on the first such call, by timing the kernels on that call's own
operands, and kept for the process. A decode step streams every weight from memory once,
and the faster orientation with the weight in cache is not the faster one from memory
(here: the other way round for most shapes), so each timed call runs after a read of a
buffer twice the last-level cache. The thread kind (main or other) is part of the key
since the engine's own thread may decode with MKL on one thread
(``serve.thread_choice``). ``warm`` makes the choices ahead of use (a server, before its
first request). Training (grad enabled), CUDA and inputs of many rows go straight to
``F.linear``. The parameters, the state dict and ``isinstance(m, nn.Linear)`` are those
of the ``nn.Linear`` it was.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from pathlib import Path

import torch
from torch import Tensor, nn

from loratree.ops import skinny

__all__ = ["BUCKETS", "MAX_ROWS", "SkinnyLinear", "choices", "warm"]

logger = logging.getLogger(__name__)

MAX_ROWS = 32
"""Inputs of more rows than this always take ``F.linear`` (prefill, training batches)."""
_TRIALS = 5
_DEFAULT_LLC = 32 << 20

Kernel = Callable[[Tensor, Tensor, Tensor | None], Tensor]
_KERNELS: dict[str, Kernel] = {"rows_first": skinny.rows_first,
                               "weight_first": skinny.weight_first,
                               "blocked": skinny.blocked}
_WIDE = 8192
"""``blocked`` is timed only for weights of at least this many rows (an LM head)."""
_chosen: dict[tuple, str] = {}


def choices() -> dict[tuple, str]:
    """The kernel kept for each (out, in, rows bucket, dtype, bias, main thread) measured
    so far."""
    return dict(_chosen)


class SkinnyLinear(nn.Linear):
    """``y = x W^T + b``, as ``nn.Linear``; see the module docstring."""

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // self.in_features if x.dim() > 1 else 1
        if (rows > MAX_ROWS or x.device.type != "cpu" or torch.is_grad_enabled()
                or x.dtype != self.weight.dtype):
            return skinny.rows_first(x, self.weight, self.bias)
        key = self._key(rows)
        name = _chosen.get(key)
        if name is None:
            name = _measure([(key, self, x)])[key]
        return _KERNELS[name](x, self.weight, self.bias)

    def _key(self, rows: int) -> tuple:
        bucket = 1 << (rows - 1).bit_length()  # 1, 2, 4, ..., MAX_ROWS
        main = threading.current_thread() is threading.main_thread()
        return (self.out_features, self.in_features, bucket, self.weight.dtype,
                self.bias is not None, main)


BUCKETS = tuple(1 << i for i in range(MAX_ROWS.bit_length()))
"""The row counts a decode step can round up to: 1, 2, 4, ..., ``MAX_ROWS``."""


@torch.inference_mode()
def warm(modules: Iterable[nn.Module], rows: Sequence[int] = BUCKETS) -> int:
    """Make, now and in the calling thread, the choice of every ``SkinnyLinear`` among
    ``modules`` (on the CPU) for each of ``rows`` not measured yet, and return how many
    choices were made. A server calls this before it takes requests, so no request waits
    for a measurement (one costs ~0.3 s here: the cache flushes). Layers of one shape
    share a choice; one flush serves one timed call of every shape."""
    pending: dict[tuple, tuple[SkinnyLinear, int]] = {}
    for m in modules:
        if isinstance(m, SkinnyLinear) and m.weight.device.type == "cpu":
            for r in rows:
                key = m._key(r)
                if key not in _chosen:
                    pending.setdefault(key, (m, r))
    if not pending:
        return 0
    started = time.perf_counter()
    flush = _flush_buffer()
    for r in sorted({r for _, r in pending.values()}):  # one weight read per flush
        _measure([(key, m, torch.randn(r, m.in_features, dtype=m.weight.dtype))
                  for key, (m, rr) in pending.items() if rr == r], flush)
    logger.info("linear orientations: %d choices measured in %.1f s", len(pending),
                time.perf_counter() - started)
    return len(pending)


def _measure(items: list[tuple[tuple, SkinnyLinear, Tensor]],
             flush: Tensor | None = None) -> dict[tuple, str]:
    """Time the kernels for each (key, layer, input) of ``items`` (interleaved,
    after a warm-up each, every timed call after a cache flush: items have distinct
    weights, so each call reads its weight from memory) and keep the faster by median."""
    flush = _flush_buffer() if flush is None else flush
    times = {key: {name: [] for name in _kernels(m)} for key, m, _ in items}
    for trial in range(_TRIALS + 1):
        for name, kernel in _KERNELS.items():
            flush.sum()  # the weights out of cache, as in a decode step
            for key, m, x in items:
                if name not in times[key]:
                    continue
                t0 = time.perf_counter()
                kernel(x, m.weight, m.bias)
                if trial:
                    times[key][name].append(time.perf_counter() - t0)
    made = {}
    for key, m, x in items:
        medians = {name: statistics.median(t) for name, t in times[key].items()}
        made[key] = _chosen[key] = min(medians, key=medians.__getitem__)
        logger.debug("linear %dx%d over %d rows: %s (%s)", m.out_features, m.in_features,
                     x.numel() // m.in_features, made[key],
                     ", ".join(f"{n} {1e6 * t:.0f} us" for n, t in medians.items()))
    return made


def _kernels(m: nn.Linear) -> tuple[str, ...]:
    if m.out_features >= _WIDE:
        return tuple(_KERNELS)
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
