"""``tree.json``: the record that makes a stored adapter a tree node, and the store's rule
for it.

A node is a LoRA adapter trained on top of its parent, stored like any adapter under its
tree path (``support/fr/acme``) with this record beside its PEFT files::

    {"parent": "support/fr", "parent_hash": "<hex>", "base_model": "...", "metrics": {...}}

An adapter without ``tree.json`` is a root, whatever its name. The record is a file of
the adapter directory like ``routing.json``, so reading and writing it lives here with
the other files; what the records mean together (lineage, path hashes, staleness,
composition) is ``loratree.tree``, which builds on the store. The store keeps two rules
of its own with it: a node is stored under its parent's name (``check_node``, on every
add), and a parent is not removed before its children (``AdapterStore.children``).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratree.errors import TreeError
from loratree.fsio import atomic_write

__all__ = [
    "TREE_NAME",
    "NodeRecord",
    "check_node",
    "parent_name",
    "read_record",
    "version_record",
    "write_record",
]

TREE_NAME = "tree.json"
MAX_RECORD_BYTES = 64 << 10
_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class NodeRecord:
    """What ``tree.json`` says about a node."""

    parent: str
    parent_hash: str
    """The parent's path hash when this node was trained or last accepted."""
    base_model: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    """Held-out metrics measured when the node was trained (eval_loss, exact_match)."""

    def to_dict(self) -> dict[str, Any]:
        return {"parent": self.parent, "parent_hash": self.parent_hash,
                "base_model": self.base_model, "metrics": dict(self.metrics)}


def parent_name(name: str) -> str | None:
    """Where a node named ``name`` must have its parent: the name minus its last part."""
    return name.rsplit("/", 1)[0] if "/" in name else None


def read_record(path: Path) -> NodeRecord | None:
    """The ``tree.json`` of an adapter directory, checked; None when there is none (a root).
    A store version is immutable, so its record is read once (``version_record``).

    Raises:
        TreeError: the record is not a small JSON object with the fields above.
    """
    f = Path(path) / TREE_NAME
    if not f.exists():
        return None
    if f.is_symlink() or not f.is_file() or f.stat().st_size > MAX_RECORD_BYTES:
        raise TreeError(f"{path.name}: {TREE_NAME} must be a regular file under "
                        f"{MAX_RECORD_BYTES} bytes")
    try:
        raw = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TreeError(f"{path.name}: {TREE_NAME} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise TreeError(f"{path.name}: {TREE_NAME} must hold a JSON object")
    parent, phash = raw.get("parent"), raw.get("parent_hash")
    base, metrics = raw.get("base_model"), raw.get("metrics") or {}
    if not isinstance(parent, str) or not parent:
        raise TreeError(f"{path.name}: {TREE_NAME} 'parent' must be an adapter name")
    if not isinstance(phash, str) or not _HEX.fullmatch(phash):
        raise TreeError(f"{path.name}: {TREE_NAME} 'parent_hash' must be 64 hex digits")
    if base is not None and not isinstance(base, str):
        raise TreeError(f"{path.name}: {TREE_NAME} 'base_model' must be a string or null")
    if not isinstance(metrics, dict) or not all(
            isinstance(k, str) and isinstance(v, int | float) for k, v in metrics.items()):
        raise TreeError(f"{path.name}: {TREE_NAME} 'metrics' must map names to numbers")
    return NodeRecord(parent, phash, base, {k: float(v) for k, v in metrics.items()})


@functools.lru_cache(maxsize=4096)
def version_record(version: Path) -> NodeRecord | None:
    """``read_record`` of an immutable store version, remembered per version directory
    (the serving path asks for it on every request)."""
    return read_record(version)


def write_record(path: str | Path, record: NodeRecord) -> None:
    """Write ``tree.json`` into an adapter directory, atomically."""
    text = json.dumps(record.to_dict(), indent=2, sort_keys=True) + "\n"
    atomic_write(Path(path) / TREE_NAME, lambda p: p.write_text(text, encoding="utf-8"))


def check_node(name: str, source: Path, kind: str) -> None:
    """Refuse to store ``source`` as ``name`` when its tree record does not fit the name:
    a node's parent is its name minus the last part, and a node is a LoRA adapter."""
    record = read_record(Path(source))
    if record is None:
        return
    if record.parent != parent_name(name):
        raise TreeError(f"{name!r}: the adapter is a child of {record.parent!r}, so it must "
                        f"be stored as {record.parent}/<name>")
    if kind != "lora":
        raise TreeError(f"{name!r}: tree nodes are LoRA adapters, this one is {kind}")
