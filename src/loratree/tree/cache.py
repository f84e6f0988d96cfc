"""A RAM cache of loaded adapters under a byte budget: LRU eviction, pinning, in-use guard.

Adapters differ in size by orders of magnitude (rank, targets, prefix length), so the
budget is in bytes, not a count. An entry is evictable only when it is neither pinned nor
in use by a running request (``acquire`` / ``release``, or ``with cache.use(name)``).
When room is needed the least recently used evictable entry goes first; if pinned and
in-use entries leave no room, ``CacheFullError`` says so and nothing is evicted.

A cached entry remembers the store version it was read from: when the store's name points
to a newer version, the next ``get`` reloads it (a miss), so replacing an adapter in the
store reaches the cache without a restart.

A tree node (``tree.nodes``) is cached composed: its entry is the whole root-to-node
path as one adapter, built from its parent's cached entry plus its own file, so serving
a deep node does not recompose per request. Its version is every version on its path, so
replacing any ancestor makes the next ``get`` recompose it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from loratree.adapters.files import AdapterFile
from loratree.adapters.prefix_files import PrefixFile
from loratree.adapters.source import AdapterRead, AdapterSource
from loratree.adapters.store import AdapterStore
from loratree.errors import AdapterInUseError, CacheFullError, TreeError
from loratree.tree.compose import compose_files
from loratree.tree.store_source import StoreSource, store_of

__all__ = ["AdapterCache", "CacheStats", "LoadedAdapter", "loaded"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedAdapter:
    """One adapter's tensors in RAM, checked, ready to copy into a slot."""

    name: str
    version: str
    kind: str
    """"lora" or "prefix"."""
    rank: int
    """LoRA: largest rank over its layers; prefix: its number of virtual tokens."""
    nbytes: int
    lora: AdapterFile | None = None
    prefix: PrefixFile | None = None


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    bytes: int
    """Bytes held now."""
    loaded_bytes: int
    """Bytes read from the store in all."""
    entries: int


@dataclass
class _Entry:
    adapter: LoadedAdapter
    pins: int = 0
    users: int = 0


class AdapterCache:
    """Loaded adapters of a store (or any ``AdapterSource``: ``Sources`` chains the store
    and plain folders), at most ``budget_bytes`` of tensors in all."""

    def __init__(self, source: AdapterStore | AdapterSource, budget_bytes: int) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
        self.source: AdapterSource = (StoreSource(source) if isinstance(source, AdapterStore)
                                      else source)
        self.store: AdapterStore | None = store_of(self.source)
        """The store among the sources (tree nodes, the router, runtime loading), if any."""
        self.budget = int(budget_bytes)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # LRU first
        self._lock = threading.RLock()
        self._bytes = self._hits = self._misses = self._evictions = self._loaded = 0
        self._pool: ThreadPoolExecutor | None = None

    # -- lookups ----------------------------------------------------------------------
    def get(self, name: str) -> LoadedAdapter:
        """The adapter, from RAM when it is there (a hit) or read from its source (a miss).
        A read that fails raises: an older version in RAM is never served in its place."""
        version = self.version_of(name)
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and entry.adapter.version == version:
                self._entries.move_to_end(name)
                self._hits += 1
                return entry.adapter
        adapter = self._load(name)  # outside the lock: reading can take a while
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and entry.adapter.version == adapter.version:
                self._entries.move_to_end(name)  # another thread loaded it meanwhile
                self._hits += 1
                return entry.adapter
            self._misses += 1
            self._loaded += adapter.nbytes
            old = self._entries.pop(name, None)
            if old is not None:
                self._bytes -= old.adapter.nbytes
            self._make_room(adapter.nbytes, name)
            new = _Entry(adapter)
            if old is not None:
                new.pins, new.users = old.pins, old.users
            self._entries[name] = new
            self._bytes += adapter.nbytes
            return adapter

    def version_of(self, name: str) -> str:
        """What ``name`` serves now: its store version (a node's: every version on its
        path), or a plain folder's file identities."""
        return self.source.version_of(name)

    def prefetch(self, name: str) -> Future[LoadedAdapter]:
        """Start loading ``name`` in the background; ``get`` will then hit."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="loratree-prefetch")
        return self._pool.submit(self.get, name)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._entries

    # -- in use and pinned ---------------------------------------------------------------
    def acquire(self, name: str) -> LoadedAdapter:
        """Get ``name`` and mark it in use (not evictable) until ``release``."""
        with self._lock:
            adapter = self.get(name)
            self._entries[name].users += 1
            return adapter

    def release(self, name: str) -> None:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.users == 0:
                raise RuntimeError(f"release of {name!r}, which is not in use")
            entry.users -= 1

    @contextmanager
    def use(self, name: str) -> Iterator[LoadedAdapter]:
        adapter = self.acquire(name)
        try:
            yield adapter
        finally:
            self.release(name)

    def pin(self, name: str) -> LoadedAdapter:
        """Keep ``name`` in RAM until ``unpin`` (loading it now if needed)."""
        with self._lock:
            adapter = self.get(name)
            self._entries[name].pins += 1
            return adapter

    def unpin(self, name: str) -> None:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.pins == 0:
                raise RuntimeError(f"unpin of {name!r}, which is not pinned")
            entry.pins -= 1

    def evict(self, name: str) -> None:
        """Drop ``name`` now; refused while it is pinned or in use."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                return
            if entry.pins or entry.users:
                raise AdapterInUseError(f"{name!r} is pinned or in use; not evicted")
            self._drop(name)

    # -- introspection -------------------------------------------------------------------
    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, self._evictions, self._bytes,
                              self._loaded, len(self._entries))

    def names(self) -> list[str]:
        """Cached names, least recently used first."""
        with self._lock:
            return list(self._entries)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    # -- internals -----------------------------------------------------------------------
    def _make_room(self, need: int, name: str) -> None:
        if need > self.budget:
            raise CacheFullError(f"{name!r} needs {need:,} bytes; the cache budget is "
                                 f"{self.budget:,}")
        free = self.budget - self._bytes
        victims = []
        for other, entry in self._entries.items():  # LRU first
            if free >= need:
                break
            if entry.pins or entry.users:
                continue
            victims.append(other)
            free += entry.adapter.nbytes
        if free < need:
            held = sum(e.adapter.nbytes for e in self._entries.values() if e.pins or e.users)
            raise CacheFullError(
                f"no room for {name!r} ({need:,} bytes): pinned and in-use adapters hold "
                f"{held:,} of {self.budget:,} bytes")
        for other in victims:
            self._drop(other)
            self._evictions += 1

    def _drop(self, name: str) -> None:
        entry = self._entries.pop(name)
        self._bytes -= entry.adapter.nbytes


    def _load(self, name: str) -> LoadedAdapter:
        return self.assemble(self.source.read(name))

    def assemble(self, read: AdapterRead) -> LoadedAdapter:
        """``read`` as the cache holds it: a tree node composed with its parent's path (the
        parent read through the cache). Also for files not yet in the source: the check
        that a node about to be added fits the slots as served, whole path included."""
        name = read.name
        if read.parent is None:
            return loaded(read)
        parent = self.get(read.parent)  # the parent path, composed and cached
        if parent.lora is None or read.lora is None:
            raise TreeError(f"{name!r}: tree nodes and their parents must be LoRA adapters")
        lora = compose_files([parent.lora, read.lora], name)
        return LoadedAdapter(name, read.version, "lora", _rank(lora), _nbytes(lora), lora=lora)


def loaded(read: AdapterRead) -> LoadedAdapter:
    """One read adapter as the cache holds it (a node: its own branch only)."""
    if read.prefix is not None:
        prefix = read.prefix
        return LoadedAdapter(read.name, read.version, "prefix", prefix.n_virtual,
                             prefix.vectors.numel() * prefix.vectors.element_size(),
                             prefix=prefix)
    assert read.lora is not None, "an AdapterRead holds a LoRA or a prefix adapter"
    return LoadedAdapter(read.name, read.version, "lora", _rank(read.lora),
                         _nbytes(read.lora), lora=read.lora)


def _rank(lora: AdapterFile) -> int:
    """The largest rank of the adapter. The tensors of adapted parameters not yet matched
    to a model (``AdapterFile.pending``) hold all experts' ranks in one dim, so for them
    the largest rank the config allows counts (the match checks it exactly)."""
    ranks = [a.shape[0] for a, _ in lora.weights.values()]
    if lora.pending:
        ranks += [lora.config.rank, *lora.config.rank_pattern.values()]
    return max(ranks, default=0)


def _nbytes(lora: AdapterFile) -> int:
    nbytes = sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                 for a, b in (*lora.weights.values(), *lora.pending.values()))
    nbytes += sum(t.numel() * t.element_size() for t in lora.biases.values())
    extra = [*lora.base_weights.values(), *lora.magnitudes.values()]
    return nbytes + lora.copy_bytes + sum(t.numel() * t.element_size() for t in extra)
