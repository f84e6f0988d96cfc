"""The store as an ``AdapterSource``: versions are immutable directories, a tree node's
version is every version on its path (``nodes.version_key``)."""

from __future__ import annotations

import logging
from pathlib import Path

from loratree.adapters.folder_source import FolderSource, plain_dirs
from loratree.adapters.node_files import version_record
from loratree.adapters.peft_format import read_config
from loratree.adapters.prefix_files import PrefixFile
from loratree.adapters.source import AdapterRead, AdapterSource, Sources, parse_adapter
from loratree.adapters.store import AdapterInfo, AdapterStore
from loratree.tree.nodes import lineage, stale, version_key

__all__ = ["StoreSource", "serving_sources", "store_of"]

logger = logging.getLogger(__name__)


class StoreSource:
    """Reads ``store``'s adapters; a node is read as its own branch plus its parent's name
    (the cache composes the path)."""

    def __init__(self, store: AdapterStore) -> None:
        self.store = store
        self.root: Path = store.root

    def __repr__(self) -> str:
        return f"StoreSource({str(self.root)!r})"

    def __contains__(self, name: object) -> bool:
        return name in self.store

    def version_of(self, name: str) -> str:
        return version_key(self.store, name)

    def read(self, name: str) -> AdapterRead:
        """The version ``name`` points to now, resolved once: the files read are the ones
        the returned version names, even if the name is replaced meanwhile."""
        path = self.store.checked_path(name)  # damage at rest: DamagedAdapterError
        version, parent = path.name, None
        if version_record(path) is not None:
            chain = lineage(self.store, name)
            _, path, record = chain[-1]
            if record is not None:
                version = "<".join(v.name for _, v, _ in reversed(chain))
                parent = record.parent
            if record is not None and stale(self.store, name):
                logger.warning("%s is stale: an ancestor changed since it was trained "
                               "(loratree tree accept %s, or retrain it)", name, name)
        adapter = parse_adapter(path, read_config(path))
        if isinstance(adapter, PrefixFile):
            return AdapterRead(name, version, path, prefix=adapter, parent=parent)
        return AdapterRead(name, version, path, lora=adapter, parent=parent)

    def info(self, name: str) -> AdapterInfo:
        return self.store.info(name)

    def list(self) -> list[AdapterInfo]:
        return self.store.list()


def store_of(source: AdapterSource) -> AdapterStore | None:
    """The store ``source`` reads (the first one, in a chain), or None."""
    if isinstance(source, StoreSource):
        return source.store
    if isinstance(source, Sources):
        return next((s.store for s in source.sources if isinstance(s, StoreSource)), None)
    return None


def serving_sources(store: AdapterStore | str | Path | None = None,
                    folders: tuple[str | Path, ...] = ()) -> AdapterSource:
    """What a server serves: the store first, then each plain folder in turn (the first
    that holds a name serves it). Logs a warning for every name a later source also holds
    (it is shadowed), and for every PEFT directory copied into the store root without
    ``loratree store add`` (never served; the log gives the command that adds it)."""
    sources: list[AdapterSource] = []
    if store is not None:
        store = store if isinstance(store, AdapterStore) else AdapterStore(store)
        sources.append(StoreSource(store))
        for name, path in plain_dirs(store.root):
            logger.warning("%s holds a PEFT adapter that is not in the store (a directory "
                           "copied under the store root is not an entry); add it with: "
                           "loratree store --store %s add %s %s", path, store.root, name, path)
    sources += [FolderSource(f) for f in folders]
    if not sources:
        raise ValueError("nothing to serve: give a store or an adapters directory")
    chain = Sources(sources)
    for name, first, later in chain.shadowed():
        logger.warning("adapter %r is in %r and in %r; the first serves it (the store comes "
                       "first, then adapters directories in the order given)", name, first,
                       later)
    return chain if len(sources) > 1 else sources[0]
