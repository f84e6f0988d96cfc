"""MKL's thread count for the calling thread only, and the OpenMP pool of the thread
that hands the model to the engine's thread (two pieces of ``CpuTuning``).

Each thread that runs OpenMP work owns a pool of worker threads. Once the process holds
more OpenMP threads than CPUs (the main thread's pool, from loading or warming the model,
plus the engine thread's), GNU OpenMP spins only briefly before its workers sleep, and
every parallel region pays to wake them, so a prefill in the engine thread can run well
behind the same prefill on the main thread. ``release_openmp_pool`` (OpenMP 5's
``omp_pause_resource_all``) frees the calling thread's pool; it comes back if that thread
runs OpenMP work again. With ``CpuTuning.release_openmp_pool``, ``Engine.start`` does that
for the thread calling it.

MKL's per-thread count is how the engine picks its decode steps' threads: on some hosts
MKL's threaded GEMMs on few rows run much slower in any thread but the first that used
MKL, and single-threaded they do not; on others one thread is the slower. The engine
measures which (``serve.cpu.thread_choice``)."""

from __future__ import annotations

import ctypes
import glob
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache

import torch

__all__ = ["available", "release_openmp_pool", "threads"]


@cache
def _set_local() -> Callable[[int], int] | None:
    """``mkl_set_num_threads_local`` of torch's MKL (returns the previous count; 0 means
    the global one), or None where torch has no MKL or does not export it."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        fn = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib",
                                      "libtorch_cpu.so")).mkl_set_num_threads_local
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    return lambda n: fn(ctypes.byref(ctypes.c_int(n)))  # the symbol takes its int by pointer


def available() -> bool:
    return _set_local() is not None


@contextmanager
def threads(n: int) -> Iterator[None]:
    """Run the block with MKL on ``n`` threads in this thread (a no-op without MKL)."""
    set_local = _set_local()
    if set_local is None:
        yield
        return
    previous = set_local(n)
    try:
        yield
    finally:
        set_local(previous)


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
