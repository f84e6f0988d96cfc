"""Adapter trees over the store: lineage, path hashes, staleness and accepting a node.

A node's record (``tree.json``, ``adapters.node_files``) names its parent and the
parent's *path hash* when the node was trained (or accepted): a hash over the content of
every adapter from the root to the parent. If any ancestor is replaced afterwards the
hashes differ and the node is **stale**: it still serves (its function is well defined),
but ``loratree tree show`` flags it until it is retrained or accepted (``accept``), which
records the current path hash. Accepting one node does not accept its descendants: each
records the path it was trained on.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import uuid
from pathlib import Path

from loratree.adapters.node_files import (
    TREE_NAME,
    NodeRecord,
    parent_name,
    read_record,
    version_record,
    write_record,
)
from loratree.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME
from loratree.adapters.store import FILES, AdapterInfo, AdapterStore
from loratree.errors import TreeError

__all__ = [
    "MAX_DEPTH",
    "accept",
    "content_hash",
    "lineage",
    "path_hash",
    "record_for",
    "stale",
    "version_key",
]

MAX_DEPTH = 32
"""Deeper paths are refused: a record chain this long is a cycle or a mistake."""


@functools.lru_cache(maxsize=4096)
def content_hash(version: Path) -> str:
    """sha256 over an adapter version's config and weights (not its tree record, so
    accepting a node does not change what its own children were trained on). Versions
    are immutable, so the hash is remembered per version directory."""
    h = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        with open(version / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def lineage(store: AdapterStore, name: str) -> list[tuple[str, Path, NodeRecord | None]]:
    """(name, version directory, record) from the root down to ``name``.

    Raises:
        TreeError: a record names a parent that is not the node's path minus one part,
            the parent is missing, or the chain is deeper than ``MAX_DEPTH``.
    """
    chain = []
    current: str | None = name
    while current is not None:
        if len(chain) >= MAX_DEPTH:
            raise TreeError(f"{name!r}: tree path deeper than {MAX_DEPTH}")
        try:
            version = store.path_of(current)
        except KeyError as e:
            raise TreeError(f"{name!r}: its ancestor {current!r} is not in the store") from e
        record = version_record(version)
        chain.append((current, version, record))
        if record is not None:
            expected = parent_name(current)
            if record.parent != expected:
                raise TreeError(f"{current!r}: {TREE_NAME} names parent {record.parent!r}; a "
                                f"node's parent is its path minus the last part ({expected!r})")
        current = None if record is None else record.parent
    return chain[::-1]


def path_hash(store: AdapterStore, name: str) -> str:
    """The hash of the content along ``name``'s path, root first."""
    h = hashlib.sha256(b"loratree-tree-path")
    for _, version, _ in lineage(store, name):
        h = hashlib.sha256(h.digest() + content_hash(version).encode())
    return h.hexdigest()


def version_key(store: AdapterStore, name: str) -> str:
    """Identifies what ``name`` serves now: its version, and for a node every version on
    its path (``own<parent<...``). A flat adapter's key is its version directory's name."""
    version = store.path_of(name)
    if version_record(version) is None:
        return version.name
    return "<".join(v.name for _, v, _ in reversed(lineage(store, name)))


def stale(store: AdapterStore, name: str) -> bool:
    """Whether a node's recorded parent path differs from its parent path now (a root is
    never stale)."""
    record = version_record(store.path_of(name))
    return record is not None and record.parent_hash != path_hash(store, record.parent)


def record_for(store: AdapterStore, parent: str, *, base_model: str | None = None,
               metrics: dict[str, float] | None = None) -> NodeRecord:
    """The record for a new child of ``parent``, as the parent's path is now."""
    return NodeRecord(parent, path_hash(store, parent), base_model, dict(metrics or {}))


def accept(store: AdapterStore, name: str) -> AdapterInfo:
    """Mark a stale node current: record its parent's path as it is now (a new version of
    the node, swapped in atomically). Its weights do not change."""
    version = store.path_of(name)
    record = read_record(version)
    if record is None:
        raise TreeError(f"{name!r} is a root adapter (no {TREE_NAME}); nothing to accept")
    fresh = NodeRecord(record.parent, path_hash(store, record.parent), record.base_model,
                       record.metrics)
    staging = store.objects / f".tmp-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        for f in FILES:
            if f != TREE_NAME and (version / f).is_file():
                shutil.copyfile(version / f, staging / f)
        write_record(staging, fresh)
        return store.add(name, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
