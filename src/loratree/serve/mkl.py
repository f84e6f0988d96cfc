"""MKL's thread count for the calling thread only.

Here MKL's threaded GEMMs on few rows run 1.5-2.5x slower in any thread but the first
that used MKL (the engine's own thread, when the model was loaded or warmed up in the
main thread), and single-threaded they do not: a decode step of 4 rows in the engine
thread took 73 ms with MKL on 2 threads and 45 ms on one (44 ms on the main thread). The
engine therefore runs decode steps off the main thread with MKL on one thread; prefill
keeps every thread, and other libraries' OpenMP work is untouched.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache

import torch

__all__ = ["available", "threads"]


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
