"""The sweep's grid: which target sets, which ranks, and the one budget every point gets.

A point of the rank plane is (target set, rank). ``SweepConfig`` names the target sets
(``"q,v"`` -> ``("q_proj", "v_proj")``), lists the ranks, says whether full fine-tuning
(the far corner) is run too, and fixes what every run shares: data, steps, batch, seed,
and the held-out rows it is scored on.

Policies, chosen once so the points are comparable:

- ``alpha = alpha_per_rank * rank`` (default 2 r): the LoRA scale ``alpha / r`` is the same
  at every rank, so one learning rate suits the whole grid.
- LoRA points train at ``lr``; full fine-tuning at ``full_lr`` (default 5e-5, the rate the
  quality benchmark uses for SmolLM2: a full fine-tune at a LoRA rate of 1e-3 wrecks the
  model in a few steps).
- Warmup is ``max(1, steps // 10)`` steps, then cosine decay, for every run.
- ``tolerance`` is in points of exact match (percentage points): 2.0 means a configuration
  within 0.02 of the best exact match (on the 0..1 scale) counts as good enough.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from loratree.surgery import STANDARD_TARGETS

__all__ = ["DEFAULT_RANKS", "DEFAULT_TARGET_SETS", "SweepConfig", "parse_ranks",
           "parse_target_sets", "slug"]

DEFAULT_RANKS = (1, 2, 4, 8, 16, 32)
DEFAULT_TARGET_SETS: tuple[tuple[str, tuple[str, ...]], ...] = tuple(
    (name, STANDARD_TARGETS[name]) for name in ("q,v", "attention", "all-linear"))
"""(name, target patterns) pairs; ``STANDARD_TARGETS`` also knows ``mlp``."""

TargetSets = tuple[tuple[str, tuple[str, ...]], ...]


def parse_target_sets(text: str) -> TargetSets:
    """``"q,v;attention;up_proj,down_proj"`` -> named target sets.

    Sets are separated by ``;``. A set that is a known name (``q,v``, ``attention``,
    ``mlp``, ``all-linear``) takes that name's patterns; any other set is a comma list of
    target patterns, named by the list as written.
    """
    sets = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        if part in STANDARD_TARGETS:
            sets.append((part, STANDARD_TARGETS[part]))
        else:
            patterns = tuple(t.strip() for t in part.split(",") if t.strip())
            sets.append((",".join(patterns), patterns))
    return tuple(sets)


def parse_ranks(text: str) -> tuple[int, ...]:
    """``"1,2,4,8"`` -> ``(1, 2, 4, 8)``; a ``ValueError`` naming a part that is no int."""
    ranks = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            ranks.append(int(part))
        except ValueError:
            raise ValueError(f"ranks: {part!r} is not an integer") from None
    return tuple(ranks)


def slug(name: str) -> str:
    """A directory name for a target set's name (``"q,v"`` -> ``"q-v"``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "set"


@dataclass(frozen=True)
class SweepConfig:
    """One sweep: every (target set, rank) point plus, optionally, full fine-tuning."""

    data: str
    """Training JSONL (as ``loratree train`` reads it)."""
    eval_data: str
    """Held-out JSONL: eval loss and exact match of greedy answers are measured on it."""
    out: str = "sweep"
    """Output directory: ``runs/<point>/`` per run, and the table, JSON, CSV and plot."""
    model: str | None = None
    """HF directory or .gguf file; None for the embedded SmolLM2."""
    target_sets: TargetSets = DEFAULT_TARGET_SETS
    """(name, target patterns) pairs, one line of the plot each."""
    ranks: tuple[int, ...] = DEFAULT_RANKS
    full: bool = True
    """Also run full fine-tuning (every weight trainable): the plane's far corner."""
    steps: int = 100
    """Optimizer steps for every run: the fixed budget."""
    batch_size: int = 8
    lr: float = 1e-3
    """Learning rate of every LoRA point."""
    full_lr: float = 5e-5
    """Learning rate of full fine-tuning (see the module docstring)."""
    alpha_per_rank: float = 2.0
    """alpha = alpha_per_rank * rank, so the scale alpha / r is the same at every rank."""
    max_length: int = 256
    seed: int = 0
    eval_examples: int = 64
    """Held-out rows answered greedily for exact match (the first ones of eval_data)."""
    max_new_tokens: int = 48
    tolerance: float = 2.0
    """Points of exact match: a configuration within this of the best is good enough."""
    rows_per_pass: int = 0
    """At most this many rows per forward/backward pass of the fused trainer (a memory
    cap); 0: the largest job's batch (``ManyConfig.rows_per_pass``)."""
    timing_steps: int = 3
    """Solo optimizer steps timed per configuration, after one warm-up step."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranks", tuple(self.ranks))
        object.__setattr__(self, "target_sets",
                           tuple((n, tuple(p)) for n, p in self.target_sets))
        problems = _number_problems(self) + _grid_problems(self)
        if not isinstance(self.data, str) or not self.data:
            problems.append(f"data must be a path, got {self.data!r}")
        if not isinstance(self.eval_data, str) or not self.eval_data:
            problems.append(f"eval_data must be a path (the sweep is scored on held-out "
                            f"rows), got {self.eval_data!r}")
        if not isinstance(self.full, bool):
            problems.append(f"full must be a bool, got {self.full!r}")
        if problems:
            raise ValueError("invalid SweepConfig: " + "; ".join(problems))

    @property
    def warmup_steps(self) -> int:
        return max(1, self.steps // 10)

    def alpha(self, rank: int) -> float:
        return self.alpha_per_rank * rank

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _number_problems(c: SweepConfig) -> list[str]:
    problems = []
    for name in ("steps", "batch_size", "max_length", "eval_examples", "max_new_tokens",
                 "timing_steps"):
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{name} must be a positive int, got {value!r}")
    for name in ("seed", "rows_per_pass"):
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            problems.append(f"{name} must be an int >= 0, got {value!r}")
    for name, positive in (("lr", True), ("full_lr", True), ("alpha_per_rank", True),
                           ("tolerance", False)):
        value = getattr(c, name)
        number = isinstance(value, int | float) and not isinstance(value, bool) \
            and math.isfinite(value)
        if not number or value < 0 or (positive and value == 0):
            kind = "a positive" if positive else "a non-negative"
            problems.append(f"{name} must be {kind} number, got {value!r}")
    return problems


def _grid_problems(c: SweepConfig) -> list[str]:
    problems = []
    if not c.ranks:
        problems.append("ranks must list at least one rank")
    bad = [r for r in c.ranks if not isinstance(r, int) or isinstance(r, bool) or r < 1]
    if bad:
        problems.append(f"ranks must be positive ints, got {bad!r}")
    if len(set(c.ranks)) != len(c.ranks):
        problems.append(f"ranks repeat: {list(c.ranks)}")
    if not c.target_sets:
        problems.append("target_sets must name at least one target set")
    names = [n for n, _ in c.target_sets]
    empty = [n for n, patterns in c.target_sets if not patterns]
    if empty:
        problems.append(f"target_sets {empty!r} have no target patterns")
    if len({slug(n) for n in names}) != len(names) or "full" in map(slug, names):
        problems.append(f"target_sets names must differ (as directory names) and not be "
                        f"'full', got {names!r}")
    return problems
