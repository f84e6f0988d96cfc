"""Measured rows to markdown: one table per group, then the acceptance checks."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = ["Check", "Row", "Table", "render", "splice", "write_atomic"]

Unit = Literal["ms", "pct", "share", "ratio", "bytes", "count", "rate"]
MIN_PEER_OVERHEAD = 0.005
"""Below this PEFT overhead (0.5%), a ratio of overheads is noise and is not shown."""


@dataclass(frozen=True)
class Row:
    """One measured quantity for us and, where it exists, for PEFT."""

    label: str
    ours: float
    peer: float | None
    unit: Unit

    def ratio(self) -> str:
        if self.peer is None:
            return "—"
        if self.unit == "pct" and (self.peer < MIN_PEER_OVERHEAD or self.ours < 0):
            return "—"
        return f"{self.ours / self.peer:.2f}" if self.peer else "—"


@dataclass(frozen=True)
class Table:
    title: str
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    peer_name: str = "PEFT"


@dataclass(frozen=True)
class Check:
    """An acceptance target and whether the measurement meets it."""

    target: str
    measured: str
    passed: bool


def fmt(value: float | None, unit: Unit) -> str:
    if value is None:
        return "—"
    if unit == "ms":
        if value < 1e-4:
            return f"{value * 1e6:.1f} µs"
        return f"{value * 1e3:.1f} ms" if value >= 0.1 else f"{value * 1e3:.2f} ms"
    if unit == "pct":
        return f"{value * 100:+.1f}%"
    if unit == "share":
        return f"{value * 100:.2f}%"
    if unit == "ratio":
        return f"{value:.3f}"
    if unit == "count":
        return f"{int(value):,}"
    if unit == "rate":
        return f"{value:,.1f}/s" if value < 100 else f"{value:,.0f}/s"
    return human_bytes(value)


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def render(
    title: str,
    machine: dict[str, str],
    method: list[str],
    tables: list[Table],
    checks: list[Check],
    sections: list[str] | None = None,
) -> str:
    """The whole markdown document."""
    out = [f"# {title}", "", "## Machine", ""]
    out += [f"- **{k}**: {v}" for k, v in machine.items()]
    out += ["", "## Method", ""] + [f"- {line}" for line in method]
    for table in tables:
        peer = table.peer_name
        out += ["", f"## {table.title}", "", f"| row | ours | {peer} | ours/{peer} |"]
        out.append("|---|---:|---:|---:|")
        for r in table.rows:
            out.append(
                f"| {r.label} | {fmt(r.ours, r.unit)} | {fmt(r.peer, r.unit)} | {r.ratio()} |"
            )
        if table.notes:
            out += [""] + [f"{note}  " for note in table.notes]
    if sections:
        out += ["", *sections]
    out += ["", "## Acceptance checks", "", "| target | measured | met |", "|---|---|---|"]
    out += [f"| {c.target} | {c.measured} | {'yes' if c.passed else 'NO'} |" for c in checks]
    return "\n".join(out) + "\n"


def _sections(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(text before the first "## " heading, [(heading, body)] in order)."""
    head, *parts = text.split("\n## ")
    out = []
    for part in parts:
        title, _, body = part.partition("\n")
        out.append((title.strip(), body))
    return head, out


def splice(old: str, new: str, note: str) -> str:
    """``old`` with the tables of ``new`` put in place of same-titled ones (new titles go
    before the quality and acceptance sections), its checks replacing same-target checks
    and appended otherwise, and ``note`` added to the method list."""
    head, old_parts = _sections(old)
    _, new_parts = _sections(new)
    fixed = {"Machine", "Method", "Acceptance checks"}
    fresh = {t: b for t, b in new_parts if t not in fixed}
    parts, placed = [], set()
    for title, body in old_parts:
        if title in fresh:
            body = fresh[title]
            placed.add(title)
        elif title == "Method":
            body = body.rstrip("\n") + f"\n- {note}\n"
        parts.append((title, body))
    tail_at = next((i for i, (t, _) in enumerate(parts)
                    if t == "Acceptance checks" or t.startswith("Quality")), len(parts))
    parts[tail_at:tail_at] = [(t, b) for t, b in fresh.items() if t not in placed]
    checks = _check_rows(dict(old_parts).get("Acceptance checks", ""))
    checks.update(_check_rows(dict(new_parts).get("Acceptance checks", "")))
    table = ["", "| target | measured | met |", "|---|---|---|", *checks.values(), ""]
    parts = [(t, "\n".join(table) if t == "Acceptance checks" else b) for t, b in parts]
    return head + "".join(f"\n## {t}\n{b}" for t, b in parts)


def _check_rows(body: str) -> dict[str, str]:
    rows = [line for line in body.splitlines()
            if line.startswith("| ") and not line.startswith(("| target ", "|---"))]
    return {line.split(" | ")[0]: line for line in rows}


def write_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temp file beside ``path``, then rename it into place."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
