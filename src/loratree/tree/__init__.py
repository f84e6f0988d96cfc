"""Adapter trees: lineage, path hashes, staleness, composition, the cache of what names
serve, and the forest view.

A tree node is a LoRA adapter stored under its tree path with a ``tree.json`` record
(``adapters.node_files``). This package is what those records mean over a store: a
node serves its whole root-to-node path composed into one adapter (``compose_files``),
cached under every version on the path (``AdapterCache``), and is stale once an ancestor
changed (``stale``, ``accept``). It sits above ``adapters`` (it reads the store and the
files) and below ``train`` and ``serve``, which both use it.
"""

from loratree.tree.cache import AdapterCache, CacheStats, LoadedAdapter
from loratree.tree.compose import compose_files
from loratree.tree.nodes import (
    MAX_DEPTH,
    accept,
    content_hash,
    lineage,
    path_hash,
    record_for,
    stale,
    version_key,
)
from loratree.tree.view import NodeView, Tree, render

__all__ = [
    "MAX_DEPTH",
    "AdapterCache",
    "CacheStats",
    "LoadedAdapter",
    "NodeView",
    "Tree",
    "accept",
    "compose_files",
    "content_hash",
    "lineage",
    "path_hash",
    "record_for",
    "render",
    "stale",
    "version_key",
]
