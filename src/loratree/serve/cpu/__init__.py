"""CPU tuning for serving: the GEMM orientation per shape and the release of the caller's
OpenMP pool, each switchable (``CpuTuning``).

Both are measured bets on the host that won the ablation (``bench.cpu_ablation``), so an
engine on a CPU runs them unless ``Engine(cpu_tuning=None)`` or ``--cpu-tuning none``;
``Engine.close`` takes the orientation off the model again.
"""

from loratree.serve.cpu.config import CpuTuning, Piece
from loratree.serve.cpu.tuner import CpuTuner

__all__ = ["CpuTuner", "CpuTuning", "Piece"]
