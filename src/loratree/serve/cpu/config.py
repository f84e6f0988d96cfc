"""``CpuTuning``: which of the engine's CPU tuning pieces are on.

Each piece is a bet on the host's BLAS and OpenMP runtime, so each can be switched on its
own, and ``bench.cpu_ablation`` times every piece alone on and alone off against all off.
A piece stays only while that ablation shows it winning (a third piece, choosing MKL's
thread count per decode thread, was deleted when it added under 5% beside the other two),
and the engine runs every piece by default on a CPU because each won there
(``docs/cpu-ablation-2026-12-06.md``); ``Engine(cpu_tuning=None)`` or
``--cpu-tuning none`` turns them off.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["CpuTuning", "Piece"]


class Piece(StrEnum):
    """One CPU tuning piece, by the name the CLI and the bench use."""

    ORIENTATION = "orientation"
    """Each plain linear times its two GEMM orientations per shape and keeps the faster."""
    OMP_RELEASE = "omp-release"
    """``Engine.start`` releases the calling thread's OpenMP worker pool."""


_FIELDS = {Piece.ORIENTATION: "gemm_orientation", Piece.OMP_RELEASE: "release_openmp_pool"}
NONE_WORDS = frozenset({"none", "off", ""})
ALL_WORDS = frozenset({"all", "on"})


@dataclass(frozen=True)
class CpuTuning:
    """The CPU tuning pieces an engine runs; ``CpuTuning()`` is all of them.

    ``gemm_orientation``: decode steps' linears run whichever GEMM orientation measured
    faster for their shape (``serve.cpu.orientation``), installed on the model by the engine
    and taken off again by ``Engine.close``. ``release_openmp_pool``: ``Engine.start``
    releases the caller's OpenMP pool (``serve.cpu.openmp``). Neither changes what the
    model computes beyond the order of floating-point sums.
    """

    gemm_orientation: bool = True
    release_openmp_pool: bool = True

    @classmethod
    def of(cls, pieces: Iterable[Piece]) -> CpuTuning:
        """The tuning with exactly ``pieces`` on."""
        on = set(pieces)
        return cls(**{field: piece in on for piece, field in _FIELDS.items()})

    @property
    def pieces(self) -> tuple[Piece, ...]:
        """The pieces that are on, in ``Piece`` order."""
        return tuple(p for p, field in _FIELDS.items() if getattr(self, field))

    def on(self, piece: Piece) -> bool:
        return bool(getattr(self, _FIELDS[piece]))

    @property
    def label(self) -> str:
        """``all``, ``none`` or the pieces on, comma-separated (what ``parse`` reads)."""
        if len(self.pieces) == len(Piece):
            return "all"
        return ",".join(self.pieces) or "none"

    @classmethod
    def parse(cls, text: str) -> CpuTuning | None:
        """``none`` (or ``off``) -> None; ``all`` (or ``on``) -> every piece; else a
        comma-separated list of ``Piece`` names. Raises ValueError naming the choices."""
        words = [w.strip().lower() for w in text.split(",") if w.strip()]
        if not words or set(words) <= NONE_WORDS:
            return None
        if set(words) <= ALL_WORDS:
            return cls()
        try:
            return cls.of(Piece(w) for w in words)
        except ValueError:
            choices = ", ".join([*Piece, "all", "none"])
            raise ValueError(f"unknown CPU tuning {text!r}; choose from {choices}") from None
