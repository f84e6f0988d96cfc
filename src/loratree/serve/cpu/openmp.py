"""The OpenMP pool of the thread that hands the model to the engine's thread (the
``omp-release`` piece of ``CpuTuning``).

Each thread that runs OpenMP work owns a pool of worker threads. Once the process holds
more OpenMP threads than CPUs (the main thread's pool, from loading or warming the model,
plus the engine thread's), GNU OpenMP spins only briefly before its workers sleep, and
every parallel region pays to wake them, so a prefill in the engine thread can run well
behind the same prefill on the main thread. ``release_openmp_pool`` (OpenMP 5's
``omp_pause_resource_all``) frees the calling thread's pool; it comes back if that thread
runs OpenMP work again. With ``CpuTuning.release_openmp_pool``, ``Engine.start`` does that
for the thread calling it."""

from __future__ import annotations

import ctypes
import glob
import os
from collections.abc import Callable
from functools import cache

import torch

__all__ = ["release_openmp_pool"]


@cache
def _pause_all() -> Callable[[int], int] | None:
    """``omp_pause_resource_all`` of the GNU OpenMP runtime torch ships, or None (another
    runtime, whose pause may stop every thread's pool, or none)."""
    libs = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib",
                                         "libgomp*.so*")))
    if not libs:
        return None
    try:
        fn = ctypes.CDLL(libs[0]).omp_pause_resource_all
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int]
    return fn


OMP_PAUSE_SOFT = 1


def release_openmp_pool() -> bool:
    """Let the calling thread's OpenMP worker threads exit (GNU OpenMP: its own pool
    only). True when released; False where the runtime is another or refused."""
    pause = _pause_all()
    return pause is not None and pause(OMP_PAUSE_SOFT) == 0
