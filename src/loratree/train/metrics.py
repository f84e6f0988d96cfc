"""``metrics.jsonl``: one JSON object per step or eval, appended as training goes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loratree.fsio import atomic_write

__all__ = ["MetricsLog", "read_metrics"]


class MetricsLog:
    """Appends records to ``metrics.jsonl``; on resume, drops records past the checkpoint."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Keep records up to ``step``: the steps after it are about to be run again."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        atomic_write(self.path, lambda p: p.write_text(text))

    def write(self, **record: Any) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every complete record of a metrics file (a torn last line is skipped)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
