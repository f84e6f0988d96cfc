"""``CpuTuner``: the engine's one handle on CPU tuning; every hook is a no-op for a piece
that is off, on another device, or with no tuning at all.

What the pieces measure is a property of the host (its BLAS, its OpenMP runtime), not of
one engine, so the measurements live in one ``HostMeasurements`` per process
(``host_measurements``): an engine started after another does not measure again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from loratree.serve.cpu import openmp
from loratree.serve.cpu.config import CpuTuning
from loratree.serve.cpu.linears import Uninstall, install_orientation, oriented_linears
from loratree.serve.cpu.orientation import OrientationTable

__all__ = ["CpuTuner", "HostMeasurements", "host_measurements"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostMeasurements:
    """The GEMM orientation per shape."""

    orientations: OrientationTable


@cache
def host_measurements() -> HostMeasurements:
    """This process's measurements (made on first use, kept for the process)."""
    return HostMeasurements(OrientationTable())


class CpuTuner:
    """Installs the tuning ``tuning`` asks for on ``model`` (when it runs on the CPU) and
    gives the engine its hooks: ``before_start``, ``warm``, ``close``."""

    def __init__(self, model: nn.Module, tuning: CpuTuning | None, device: torch.device,
                 host: HostMeasurements | None = None) -> None:
        self.tuning = tuning if device.type == "cpu" else None
        self._model = model
        self._host = host
        self._uninstall: Uninstall | None = None
        if self.tuning is not None and self.tuning.gemm_orientation:
            # decode steps multiply few rows: each plain linear runs the GEMM orientation
            # measured faster for its shape; values are those of F.linear up to rounding
            self._uninstall = install_orientation(model, self.host.orientations)

    @property
    def host(self) -> HostMeasurements:
        if self._host is None:
            self._host = host_measurements()
        return self._host

    def before_start(self) -> None:
        """In the thread that starts the engine: release its OpenMP pool, if asked to
        (with it and the loop's both alive, every parallel region in the loop's forwards
        may wait for sleeping workers)."""
        if self.tuning is not None and self.tuning.release_openmp_pool:
            if not openmp.release_openmp_pool():
                logger.info("OpenMP pool not released: the runtime is not GNU OpenMP")

    def warm(self) -> int:
        """In the engine's thread, before its first request: make every orientation
        choice now (choices are kept per thread kind); how many were made."""
        if self._uninstall is None:
            return 0
        return self.host.orientations.warm(oriented_linears(self._model))

    def close(self) -> int:
        """Take the installed orientation off the model; how many linears it restored."""
        uninstall, self._uninstall = self._uninstall, None
        return 0 if uninstall is None else uninstall()
