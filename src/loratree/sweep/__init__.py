"""``loratree sweep``: the rank plane, measured.

Which matrices to adapt and at what rank form a plane; its origin is the frozen model and
its far corner full fine-tuning. A sweep trains a grid of target sets x ranks in one fused
pass (plus full fine-tuning on its own) with one step budget, scores every point on the
same held-out rows, and recommends the smallest configuration within a tolerance of the
best.
"""

from loratree.sweep.grid import (
    DEFAULT_RANKS,
    DEFAULT_TARGET_SETS,
    SweepConfig,
    parse_ranks,
    parse_target_sets,
)
from loratree.sweep.report import SweepResult, SweepRow, recommend, write_reports
from loratree.sweep.run import point_config, run_sweep

__all__ = [
    "DEFAULT_RANKS",
    "DEFAULT_TARGET_SETS",
    "SweepConfig",
    "SweepResult",
    "SweepRow",
    "parse_ranks",
    "parse_target_sets",
    "point_config",
    "recommend",
    "run_sweep",
    "write_reports",
]
