"""A small timing harness: interleaved repeats in one process, medians, machine facts.

Interleaving (ours, peer, ours, peer, ...) puts every contender under the same drift of a
noisy machine; medians discard the occasional stall. Nothing here knows about LoRA.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

__all__ = [
    "Timing",
    "configure_threads",
    "forward_fn",
    "interleaved",
    "machine_info",
    "paired_ratio",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timing:
    """Wall-clock samples of one contender, in seconds."""

    samples: tuple[float, ...]
    redone: int = 0
    """Rounds run again because other processes were busy during them."""

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def describe(self) -> str:
        spread = "n/a" if math.isnan(self.spread) else f"{100 * self.spread:.1f}%"
        redone = f", {self.redone} disturbed rounds redone" if self.redone else ""
        return f"median {1e3 * self.median:.1f} ms over {len(self.samples)} (IQR {spread}{redone})"

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median (0.10 = 10%)."""
        if len(self.samples) < 4:
            return float("nan")
        q1, _, q3 = statistics.quantiles(self.samples, n=4)
        return (q3 - q1) / self.median


def paired_ratio(a: Timing, b: Timing) -> float:
    """Median over rounds of a_i / b_i, for two contenders timed in the same rounds.

    Each pair ran seconds apart, so slow drift of the machine cancels within a pair.
    """
    assert len(a.samples) == len(b.samples), "paired timings need the same rounds"
    return statistics.median(x / y for x, y in zip(a.samples, b.samples, strict=True))


def configure_threads() -> int:
    """Give torch every core this process may run on; returns the thread count."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(n or 1)
    return torch.get_num_threads()


def forward_fn(model: torch.nn.Module, input_ids: torch.Tensor) -> Callable[[], object]:
    """A no-argument forward pass of a causal LM under ``inference_mode`` (no KV cache)."""

    def run() -> object:
        with torch.inference_mode():
            return model(input_ids=input_ids, use_cache=False)

    return run


def interleaved(
    fns: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    rotate: bool = True,
    max_redo: int | None = None,
) -> dict[str, Timing]:
    """Time every callable once per round, for ``repeats`` rounds, after ``warmup`` rounds.

    With ``rotate`` each round starts one contender later, so none always runs first
    (after a stall, or with the cache warm from its own previous call). Stateful steps
    that must run in a fixed order (merge, then unmerge) pass ``rotate=False``.

    A round during which other processes used more than ``BUSY_LIMIT`` cores is run again,
    at most ``max_redo`` times in all (default ``repeats // 4``); after that, disturbed
    rounds are kept. The count of redone rounds is in ``Timing.redone``.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    budget = repeats // 4 if max_redo is None else max_redo
    samples: dict[str, list[float]] = {name: [] for name in names}
    redone = 0
    while len(samples[names[0]]) < repeats:
        i = len(samples[names[0]]) + redone
        k = i % len(names) if rotate else 0
        meter = OtherLoad()
        times = {}
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[name]()
            times[name] = time.perf_counter() - t0
        busy = meter.cores()
        if busy > BUSY_LIMIT and redone < budget:
            redone += 1
            log.info("  round disturbed (other processes used %.2f cores); redoing it", busy)
            continue
        for name, t in times.items():
            samples[name].append(t)
    return {name: Timing(tuple(s), redone) for name, s in samples.items()}


class OtherLoad:
    """CPU used by processes other than this one since construction, from ``/proc``.

    Counts busy time of all cores (steal included: a neighbouring VM also takes our
    cores) minus this process's own user + system time. Reads 0 where ``/proc`` is absent.
    """

    def __init__(self) -> None:
        self.start = (time.perf_counter(), _all_busy_ticks(), _own_ticks())

    def cores(self) -> float:
        wall = time.perf_counter() - self.start[0]
        others = (_all_busy_ticks() - self.start[1]) - (_own_ticks() - self.start[2])
        return max(others, 0) / _TICKS / wall if wall > 0 else 0.0


BUSY_LIMIT = 0.25
"""Cores' worth of other processes' CPU during a round above which it is redone."""
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _all_busy_ticks() -> int:
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0
    ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
    return sum(ticks) - ticks[3] - ticks[4]


def _own_ticks() -> int:
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime, stime of all threads


def machine_info() -> dict[str, str]:
    """What the numbers were measured on, for the report."""
    versions = {}
    for pkg in ("torch", "transformers", "peft"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return {
        "CPU": _cpu_model(),
        "cores usable / torch threads": f"{_usable_cores()} / {torch.get_num_threads()}",
        "RAM": _ram(),
        "Python": platform.python_version(),
        "torch / transformers / peft": " / ".join(versions.values()),
        "date (UTC)": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
    }


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _cpu_model() -> str:
    path = Path("/proc/cpuinfo")
    if path.exists():
        for line in path.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _ram() -> str:
    path = Path("/proc/meminfo")
    if path.exists():
        for line in path.read_text().splitlines():
            if line.startswith("MemTotal:"):
                kib = int(line.split()[1])
                return f"{kib / 2**20:.1f} GiB"
    return "unknown"
