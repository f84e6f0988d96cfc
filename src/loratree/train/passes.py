"""How a fused step's rows are cut into forward/backward passes (``train.many``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from loratree.models.chat import Example

__all__ = ["MAX_EXTRA_PADDING", "passes"]

J = TypeVar("J")
"""A job (any object; only its identity is used)."""

MAX_EXTRA_PADDING = 0.05
"""A fused pass pads every row to its longest; a job whose rows are shorter starts a pass
of its own rather than pad the pass by more than this share of its tokens (beyond the
padding each job has alone)."""


def passes(parts: Sequence[tuple[J, Sequence[Example]]], width: int = 0
           ) -> list[list[tuple[J, Example]]]:
    """A fused step's rows cut into forward/backward passes.

    Jobs go longest row first and each job's rows stay together, so a pass is sorted by
    slot and, when its jobs have as many rows each, every LoRA layer runs the pass as one
    view per job (``ops.slots.grouped_branch``). A pass ends at ``width`` rows (0: no
    limit) and before a job whose shorter rows would pad it by more than
    ``MAX_EXTRA_PADDING``.
    """
    longest = {id(job): max(len(e) for e in rows) for job, rows in parts if rows}
    ordered = sorted((p for p in parts if p[1]), key=lambda p: -longest[id(p[0])])
    out: list[list[tuple[J, Example]]] = []
    extra = 0
    for job, rows in ordered:
        length = longest[id(job)]
        current = out[-1] if out else None
        if current is not None:
            top = longest[id(current[0][0])]  # the pass's longest row
            grown = extra + len(rows) * (top - length)
            if (not width or len(current) + len(rows) <= width) and \
                    grown <= MAX_EXTRA_PADDING * (len(current) + len(rows)) * top:
                current += [(job, e) for e in rows]
                extra = grown
                continue
        extra = 0
        step = width or len(rows)
        out += [[(job, e) for e in rows[i : i + step]] for i in range(0, len(rows), step)]
    return out
