"""A store's adapters seen as a forest: each node with its path, ranks, size, metrics and
staleness; composed adapters (through the serving cache); a terminal drawing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loratree.adapters import AdapterFile, AdapterStore
from loratree.adapters.files import write_adapter_file
from loratree.adapters.node_files import read_record
from loratree.errors import TreeError
from loratree.tree import nodes
from loratree.tree.cache import AdapterCache

__all__ = ["NodeView", "Tree", "render"]


@dataclass(frozen=True)
class NodeView:
    """One adapter of the store as a tree node."""

    name: str
    parent: str | None
    depth: int
    """1 for a root adapter, 2 for its child, ..."""
    rank: int
    """The node's own (largest) rank."""
    total_rank: int
    """The rank of its composed path (the sum along the path, per module; the largest)."""
    size: int
    """Bytes of the node's own files."""
    metrics: dict[str, float]
    stale: bool
    children: tuple[str, ...] = field(default=())


class Tree:
    """The adapter tree of one store. Composed adapters come from an ``AdapterCache``
    (the one the serving path uses), which composes a node from its parent's cached entry
    and keys it by every version on its path: a node is composed once per version of its
    path, and replacing an ancestor makes its descendants recompose (and show as stale)."""

    def __init__(self, store: AdapterStore | str | Path,
                 cache_bytes: int = 1 << 34) -> None:
        self.store = store if isinstance(store, AdapterStore) else AdapterStore(store)
        self.cache = AdapterCache(self.store, cache_bytes)

    def path(self, name: str) -> list[str]:
        """The names from the root down to ``name``."""
        return [n for n, _, _ in nodes.lineage(self.store, name)]

    def depth(self, name: str) -> int:
        return len(self.path(name))

    def composed(self, name: str) -> AdapterFile:
        """The node's whole path as one adapter (rank concatenation, scales folded)."""
        adapter = self.cache.get(name).lora
        if adapter is None:
            raise TreeError(f"{name!r} is a prefix adapter; tree nodes are LoRA adapters")
        return adapter

    def total_rank(self, name: str) -> int:
        return max(a.shape[0] for a, _ in self.composed(name).weights.values())

    def stale(self, name: str) -> bool:
        return nodes.stale(self.store, name)

    def accept(self, name: str) -> None:
        """Record the current parent path as the one ``name`` builds on (clears stale)."""
        nodes.accept(self.store, name)

    def export(self, name: str, out: str | Path) -> Path:
        """Write the composed node as one flat PEFT adapter directory (usable by PEFT or
        vLLM without loratree)."""
        return write_adapter_file(self.composed(name), out)

    def nodes(self) -> list[NodeView]:
        """Every LoRA adapter of the store as a node, sorted by name."""
        views = []
        infos = [i for i in self.store.list() if i.kind == "lora"]
        kids: dict[str, list[str]] = {}
        records = {}
        for info in infos:
            records[info.name] = read_record(info.path)
            if records[info.name] is not None:
                kids.setdefault(records[info.name].parent, []).append(info.name)
        for info in infos:
            record = records[info.name]
            views.append(NodeView(
                name=info.name, parent=record.parent if record else None,
                depth=self.depth(info.name), rank=info.rank,
                total_rank=self.total_rank(info.name), size=info.size,
                metrics=dict(record.metrics) if record else {},
                stale=self.stale(info.name), children=tuple(sorted(kids.get(info.name, ())))))
        return views


def render(views: list[NodeView]) -> str:
    """The forest as text, one node per line: name, own rank / path rank, size, metrics,
    and a STALE flag."""
    by_name = {v.name: v for v in views}
    lines = [f"{'node':<40} {'rank':>5} {'path':>5} {'bytes':>11}  metrics"]

    def line(v: NodeView, prefix: str, last: bool, root: bool) -> None:
        branch = "" if root else ("└── " if last else "├── ")
        label = prefix + branch + (v.name if root else v.name.rsplit("/", 1)[-1])
        metrics = "  ".join(f"{k} {val:.3g}" for k, val in sorted(v.metrics.items()))
        flag = "  STALE (retrain, or `loratree tree accept`)" if v.stale else ""
        lines.append(f"{label:<40} {v.rank:>5} {v.total_rank:>5} {v.size:>11,}  "
                     f"{metrics or '-'}{flag}")
        kids = [by_name[c] for c in v.children if c in by_name]
        for i, kid in enumerate(kids):
            more = "" if root else ("    " if last else "│   ")
            line(kid, prefix + more, i == len(kids) - 1, False)

    for v in views:
        if v.parent is None:
            line(v, "", True, True)
    return "\n".join(lines)
