"""Adapter trees in the store: node records, lineage, staleness and path composition.

A tree node is a LoRA adapter trained on top of its parent. It is stored like any adapter,
named by its path (``support/fr/acme``), plus a ``tree.json`` record::

    {"parent": "support/fr", "parent_hash": "<hex>", "base_model": "...", "metrics": {...}}

``parent`` must be the node's own name minus its last part (a node's place in the store is
its place in the tree); an adapter without ``tree.json`` is a root, whatever its name.
``parent_hash`` is the parent's *path hash* when the node was trained (or accepted): a hash
over the content of every adapter from the root to the parent. If any ancestor is replaced
afterwards the hashes differ and the node is **stale**: it still serves (its function is
well defined), but ``loratree tree show`` flags it until it is retrained or accepted
(``accept``), which records the current path hash. Accepting one node does not accept
its descendants: each records the path it was trained on.

A node's effective update is the sum of the updates along its path, and that sum is one
LoRA of the summed rank (``ops.compose.concat``), so a node fills one slot like any
adapter. The composed adapter is written with each module's scale folded into B and
``lora_alpha = r`` per module (scale 1), so PEFT and vLLM read it as a plain adapter.

This lives under ``adapters`` (not ``tree/``) because the cache, the engine and the
trainer all need it, and those layers may not import the ``tree`` application.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratree.adapters.files import AdapterFile
from loratree.adapters.peft_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    config_from_peft,
    config_to_peft,
)
from loratree.adapters.store import FILES, AdapterInfo, AdapterStore
from loratree.adapters.summary import summarize
from loratree.errors import TreeError
from loratree.fsio import atomic_write
from loratree.layers import SlotSpec
from loratree.ops import compose
from loratree.surgery.targets import pattern_value

__all__ = [
    "MAX_DEPTH",
    "TREE_NAME",
    "NodeRecord",
    "accept",
    "check_node",
    "children",
    "compose_files",
    "content_hash",
    "lineage",
    "path_hash",
    "read_record",
    "record_for",
    "stale",
    "version_key",
    "version_record",
    "write_record",
]

logger = logging.getLogger(__name__)

TREE_NAME = "tree.json"
MAX_DEPTH = 32
"""Deeper paths are refused: a record chain this long is a cycle or a mistake."""
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


_record_memo: dict[str, NodeRecord | None] = {}
_hash_memo: dict[str, str] = {}
_memo_lock = threading.Lock()
"""Store versions are immutable, so what is read from one is remembered per directory."""


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


def check_node(name: str, source: Path, kind: str) -> None:
    """Refuse to store ``source`` as ``name`` when its tree record does not fit the name:
    a node's parent is its name minus the last part, and a node is a LoRA adapter."""
    record = read_record(Path(source))
    if record is None:
        return
    expected = name.rsplit("/", 1)[0] if "/" in name else None
    if record.parent != expected:
        raise TreeError(f"{name!r}: the adapter is a child of {record.parent!r}, so it must "
                        f"be stored as {record.parent}/<name>")
    if kind != "lora":
        raise TreeError(f"{name!r}: tree nodes are LoRA adapters, this one is {kind}")


def version_record(version: Path) -> NodeRecord | None:
    """``read_record`` of an immutable store version, remembered per version directory."""
    key = str(version)
    with _memo_lock:
        if key in _record_memo:
            return _record_memo[key]
    record = read_record(version)
    with _memo_lock:
        if len(_record_memo) > 4096:
            _record_memo.clear()
        _record_memo[key] = record
    return record


def write_record(path: str | Path, record: NodeRecord) -> None:
    """Write ``tree.json`` into an adapter directory, atomically."""
    text = json.dumps(record.to_dict(), indent=2, sort_keys=True) + "\n"
    atomic_write(Path(path) / TREE_NAME, lambda p: p.write_text(text, encoding="utf-8"))


# -- hashes and lineage -------------------------------------------------------------------


def content_hash(version: Path) -> str:
    """sha256 over an adapter version's config and weights (not its tree record, so
    accepting a node does not change what its own children were trained on). Versions
    are immutable, so the hash is remembered per version directory."""
    key = str(version)
    with _memo_lock:
        if key in _hash_memo:
            return _hash_memo[key]
    h = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        with open(version / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    digest = h.hexdigest()
    with _memo_lock:
        if len(_hash_memo) > 4096:
            _hash_memo.clear()
        _hash_memo[key] = digest
    return digest


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
            expected = current.rsplit("/", 1)[0] if "/" in current else None
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


def children(store: AdapterStore, name: str) -> list[str]:
    """The nodes whose record names ``name`` as their parent."""
    d = store.root / name
    if not d.is_dir() or d.is_symlink():
        return []
    kids = []
    for sub in sorted(d.iterdir()):
        child = f"{name}/{sub.name}"
        if sub.name.startswith(".") or not sub.is_dir() or child not in store:
            continue
        record = version_record(store.path_of(child))
        if record is not None and record.parent == name:
            kids.append(child)
    return kids


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


# -- composition --------------------------------------------------------------------------
def compose_files(files: list[AdapterFile], label: str = "") -> AdapterFile:
    """The adapters of a path (root first) as one adapter: per module, the ranks of the
    nodes that adapt it, concatenated, with each node's scale folded into its B columns.

    Raises:
        TreeError: two nodes disagree on a module's shapes, or on the base model.
    """
    if not files:
        raise TreeError(f"{label}: nothing to compose")
    if len(files) == 1:
        return files[0]
    if any(f.config.use_dora for f in files):
        raise TreeError(f"{label}: a DoRA adapter on a path does not compose into one LoRA "
                        "adapter (its magnitude rescales the sum, not one term)")
    if any(f.tokens for f in files):
        raise TreeError(f"{label}: adapters with trainable token rows replace rows rather "
                        "than add to them; they cannot be composed along a tree path")
    if any(f.pending or f.params for f in files):
        raise TreeError(f"{label}: adapters of fused parameters (target_parameters) cannot "
                        "be composed along a tree path yet")
    bases = {f.base_model for f in files} - {None}
    if len(bases) > 1:
        raise TreeError(f"{label}: the path's adapters were trained on different base models "
                        f"({', '.join(sorted(bases))})")
    pieces: dict[str, list[tuple]] = {}
    for f in files:
        for module, (a, b) in f.weights.items():
            spec = _spec(f, module, a.shape[0])
            pieces.setdefault(module, []).append((a, b, spec.scale))
    weights = {}
    for module, factors in pieces.items():
        try:
            weights[module] = compose.concat(factors)
        except ValueError as e:
            raise TreeError(f"{label}: {module!r}: {e}") from e
    specs = {m: SlotSpec(a.shape[0], float(a.shape[0])) for m, (a, _) in weights.items()}
    last = files[-1].raw_config
    raw = config_to_peft(summarize(specs), sorted(weights), base_model=bases.pop() if bases
                         else None, task_type=last.get("task_type"),
                         fan_in_fan_out=bool(last.get("fan_in_fan_out", False)))
    embeddings = frozenset().union(*(f.embeddings for f in files))
    return AdapterFile(config_from_peft(raw), weights, {}, raw, embeddings)


def _spec(f: AdapterFile, module: str, rank: int) -> SlotSpec:
    c = f.config
    alpha = float(pattern_value(c.alpha_pattern, module, c.alpha))
    return SlotSpec(rank, alpha, rslora=c.use_rslora)
