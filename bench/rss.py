"""``python -m bench.rss DIR DTYPE``: load a saved model in this fresh process, print memory.

Prints one JSON line: ``tensor_bytes`` (unique storages of parameters and buffers),
``rss_growth`` (resident set after the load minus after the imports) and ``peak_growth``
(the high-water mark minus the same baseline), all in bytes. Every tensor is read once
before measuring, so memory-mapped weights count as a forward pass would make them
resident. Linux ``/proc`` only.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch

from loratree.models import load_base


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def main(argv: list[str]) -> int:
    path, dtype = argv
    gc.collect()
    before = _status_kib("VmRSS") * 1024
    model, _ = load_base(path, dtype=getattr(torch, dtype))
    tensors = list(model.parameters()) + list(model.buffers())
    with torch.no_grad():
        for t in tensors:  # page in memory-mapped weights: count what a forward would touch
            t.float().sum() if t.is_floating_point() else t.sum()
    gc.collect()
    after = _status_kib("VmRSS") * 1024
    peak = _status_kib("VmHWM") * 1024
    storages = {}
    for t in tensors:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    print(json.dumps({"tensor_bytes": sum(storages.values()), "rss_growth": after - before,
                      "peak_growth": peak - before}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
