"""Per-replica adapter loads, kept outside the replicas so a replica's death loses none.

Each replica reports when it starts (its id and process id) and each adapter it loads into
or evicts from its cache on Ray's say-so; ``snapshot`` is what ``GET /ray/replicas``
shows. It is a plain class: ``app`` makes it a one-replica Serve deployment.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["LoadLedger"]


@dataclass
class _Replica:
    pid: int
    started: float
    loads: Counter[str] = field(default_factory=Counter)
    evictions: Counter[str] = field(default_factory=Counter)
    held: list[str] = field(default_factory=list)
    """Adapters Ray's router counts as on this replica, least recently used first."""


class LoadLedger:
    def __init__(self) -> None:
        self._replicas: dict[str, _Replica] = {}

    def started(self, replica: str, pid: int) -> None:
        self._replicas[replica] = _Replica(pid, time.time())

    def loaded(self, replica: str, adapter: str, held: list[str]) -> None:
        self._of(replica).loads[adapter] += 1
        self._of(replica).held = held

    def evicted(self, replica: str, adapter: str, held: list[str]) -> None:
        self._of(replica).evictions[adapter] += 1
        self._of(replica).held = held

    def _of(self, replica: str) -> _Replica:
        """A replica's record; one the ledger missed starting (it was restarted itself)
        gets a record with pid 0."""
        return self._replicas.setdefault(replica, _Replica(0, time.time()))

    def snapshot(self) -> dict:
        """``{"replicas": {id: {pid, started, loads, evictions, held}}, "adapters":
        {adapter: [ids of the replicas that ever loaded it]}}``."""
        replicas = {rid: {"pid": r.pid, "started": r.started, "loads": dict(r.loads),
                          "evictions": dict(r.evictions), "held": list(r.held)}
                    for rid, r in self._replicas.items()}
        adapters: dict[str, list[str]] = {}
        for rid, r in self._replicas.items():
            for name in r.loads:
                adapters.setdefault(name, []).append(rid)
        return {"replicas": replicas, "adapters": adapters}
