"""Deleting vLLM cache entries that nothing needs any more.

An entry is written once per content version and never changes, so replacing adapters
leaves old entries behind. One is deleted when both hold:

- it is not the current version of any name in the store (the store's names and tree
  paths, as the resolver would compose them now), and
- it was last handed to vLLM (``MaterialisedCache.get`` marks the manifest's mtime) longer
  ago than the given age.

Why an age and not "not current": a vLLM server that resolved a name before it was
replaced keeps that entry's path, and reloads from it after evicting the adapter from its
own cache; the age leaves such servers time to be unloaded or restarted. A cache shared by
several stores is pruned against one store at a time: an entry current for another store
but unused for the age is deleted too, and rebuilt on its next request. Half-written
entries of a crashed build (``.<key>.*.tmp``), or of a crashed prune, older than the age
are deleted as well.

An entry is renamed out of the way before it is deleted, so a request never sees half of
one: it finds the entry whole, or absent (and rebuilds it).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from loratree.tree import nodes
from loratree.vllm_plugin.cache import ENTRY_FORMAT, MANIFEST, MaterialisedCache

__all__ = ["PruneReport", "prune_cache"]

log = logging.getLogger(__name__)

_ENTRY = re.compile(r"v(\d+)-([0-9a-f]+)")
_PARTIAL = re.compile(r"\.[0-9a-fv-]+\..*\.(tmp|pruned)")


@dataclass(frozen=True)
class PruneReport:
    removed: tuple[str, ...]
    """Entry directory names deleted (or that would be, with ``dry_run``)."""
    freed_bytes: int
    kept_current: int
    """Entries that are some name's current version."""
    kept_recent: int
    """Entries of no current version, used within the age."""


def prune_cache(cache: MaterialisedCache, older_than_s: float, *, dry_run: bool = False,
                now: float | None = None) -> PruneReport:
    """Delete ``cache``'s entries that are no current version of its store's names and
    were last used more than ``older_than_s`` seconds ago (see the module docstring)."""
    if older_than_s < 0:
        raise ValueError(f"older_than_s must be >= 0, got {older_than_s}")
    now = time.time() if now is None else now
    current = _current_keys(cache)
    removed, freed, kept_current, kept_recent = [], 0, 0, 0
    for entry in sorted(cache.root.iterdir()):
        if entry.is_symlink() or not entry.is_dir():
            continue
        match = _ENTRY.fullmatch(entry.name)
        if match is None and _PARTIAL.fullmatch(entry.name) is None:
            continue  # not ours
        if match is not None and int(match[1]) == ENTRY_FORMAT and match[2] in current:
            kept_current += 1
            continue
        if now - _last_used(entry) < older_than_s:
            kept_recent += 1
            continue
        size = _size(entry)
        if not dry_run and not _remove(entry):
            continue
        removed.append(entry.name)
        freed += size
    return PruneReport(tuple(removed), freed, kept_current, kept_recent)


def _current_keys(cache: MaterialisedCache) -> set[str]:
    """The content key of every name in the store (those that cannot be read have none:
    the resolver would refuse them, so no entry is current for them)."""
    keys = set()
    for info in cache.store.list():
        try:
            keys.add(nodes.path_hash(cache.store, info.name))
        except (OSError, ValueError, KeyError) as e:  # damaged or gone: typed errors
            log.debug("no current version for %r: %s", info.name, e)
    return keys


def _last_used(entry: Path) -> float:
    """When the entry was last handed out (its manifest's mtime), else when it was made."""
    for path in (entry / MANIFEST, entry):
        try:
            return path.stat().st_mtime
        except OSError:
            continue
    return 0.0


def _size(entry: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(entry):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def _remove(entry: Path) -> bool:
    """Rename ``entry`` aside, then delete it; False when another process got there first."""
    aside = entry.with_name(f".{entry.name}.{os.getpid()}.pruned")
    try:
        os.rename(entry, aside)
    except FileNotFoundError:
        return False
    shutil.rmtree(aside, ignore_errors=True)
    log.info("pruned vLLM cache entry %s", entry.name)
    return True
