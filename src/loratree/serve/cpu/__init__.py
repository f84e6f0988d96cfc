"""Opt-in CPU tuning for serving: GEMM orientation per shape, MKL threads per decode
thread, and the release of the caller's OpenMP pool, each switchable (``CpuTuning``).

Everything here is a measured bet on the host; none of it is on unless
``Engine(cpu_tuning=CpuTuning(...))`` or ``loratree serve --cpu-tuning`` asks for it, and
``Engine.close`` takes it off the model again.
"""

from loratree.serve.cpu.config import CpuTuning, Piece
from loratree.serve.cpu.tuner import CpuTuner

__all__ = ["CpuTuner", "CpuTuning", "Piece"]
