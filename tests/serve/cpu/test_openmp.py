"""The engine's thread setting: the caller's OpenMP pool released."""

import glob
import os
import time

import pytest
import torch

from loratree.serve.cpu import openmp

HAS_GOMP = bool(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*")))


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not HAS_GOMP or torch.get_num_threads() < 2,
                    reason="needs torch's GNU OpenMP and 2 threads")
def test_release_openmp_pool_ends_this_threads_workers_and_torch_still_computes():
    a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    want = a.double() @ a.double()
    (a @ a).sum()  # a parallel region: this thread's pool has its workers now
    before = _threads()
    assert openmp.release_openmp_pool()
    deadline = time.monotonic() + 2
    while _threads() >= before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _threads() < before  # the pool's worker threads have exited
    torch.testing.assert_close((a @ a).double(), want, rtol=1e-4, atol=1e-3)  # pool is back
