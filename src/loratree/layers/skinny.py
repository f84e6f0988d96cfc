"""``SkinnyLinear``: an ``nn.Linear`` that, for inputs of few rows outside autograd (a
decode step on the CPU), runs whichever GEMM orientation of ``ops.skinny`` it measured to
be faster for that shape.

The choice is made once per (out, in, rows rounded up to a power of two, dtype, bias,
thread kind) on the first such call, by timing both orientations on that call's own
operands, and kept for the process. A decode step streams every weight from memory once,
and the faster orientation with the weight in cache is not the faster one from memory
(here: the other way round for most shapes), so each timed call runs after a read of a
buffer twice the last-level cache. The thread kind (main or other) is part of the key
since the engine's own thread may decode with MKL on one thread (``serve.thread_choice``). Training
(grad enabled), CUDA and inputs of many rows go straight to ``F.linear``. The parameters,
the state dict and ``isinstance(m, nn.Linear)`` are those of the ``nn.Linear`` it was.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
from torch import Tensor, nn

from loratree.ops import skinny

__all__ = ["MAX_ROWS", "SkinnyLinear", "choices"]

logger = logging.getLogger(__name__)

MAX_ROWS = 32
"""Inputs of more rows than this always take ``F.linear`` (prefill, training batches)."""
_TRIALS = 5
_DEFAULT_LLC = 32 << 20

Kernel = Callable[[Tensor, Tensor, Tensor | None], Tensor]
_KERNELS: dict[str, Kernel] = {"rows_first": skinny.rows_first,
                               "weight_first": skinny.weight_first}
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
        bucket = 1 << (rows - 1).bit_length()  # 1, 2, 4, ..., MAX_ROWS
        main = threading.current_thread() is threading.main_thread()
        key = (self.out_features, self.in_features, bucket, x.dtype, self.bias is not None,
               main)
        name = _chosen.get(key)
        if name is None:
            name = _chosen[key] = self._measure(x, rows)
        return _KERNELS[name](x, self.weight, self.bias)

    def _measure(self, x: Tensor, rows: int) -> str:
        """Time both orientations on ``x`` (interleaved, after a warm-up each); the faster
        by median."""
        times: dict[str, list[float]] = {name: [] for name in _KERNELS}
        flush = torch.ones(2 * _last_level_cache() // 4)  # float32
        for trial in range(_TRIALS + 1):
            for name in times:
                flush.sum()  # the weight out of cache, as in a decode step
                t0 = time.perf_counter()
                _KERNELS[name](x, self.weight, self.bias)
                if trial:
                    times[name].append(time.perf_counter() - t0)
        medians = {name: statistics.median(t) for name, t in times.items()}
        best = min(medians, key=medians.__getitem__)
        logger.debug("linear %dx%d over %d rows: %s (%s)", self.out_features,
                     self.in_features, rows, best,
                     ", ".join(f"{n} {1e6 * t:.0f} us" for n, t in medians.items()))
        return best


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
