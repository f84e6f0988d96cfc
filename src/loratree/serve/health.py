"""The engine's fault record, which ``/health`` and the metrics report."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Health"]


@dataclass
class Health:
    """Engine faults: steps that raised (their running requests fail with the error) and
    admissions that failed for reasons other than the request itself."""

    faults: int = 0
    consecutive_failures: int = 0
    """Faults since the last model call that succeeded (health is bad while above 0)."""
    last_error: str | None = None

    def failed(self, error: BaseException) -> None:
        """Record a fault (reported until a model call succeeds)."""
        self.faults += 1
        self.consecutive_failures += 1
        self.last_error = f"{type(error).__name__}: {error}"

    def ok(self) -> None:
        """A model call succeeded."""
        self.consecutive_failures = 0
