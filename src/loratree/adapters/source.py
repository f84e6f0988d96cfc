"""Where served adapters come from: one protocol for the store and for plain folders.

The serving cache (``tree.cache``) reads adapters through ``AdapterSource``: a name's
current version (a cheap key: the cache reloads when it changes) and the adapter read
whole at one version. The store is one source (``tree.store_source``: its versions are
immutable directories), a folder of plain PEFT directories another
(``adapters.folder_source``: its version is the files' identity and mtime). ``Sources``
chains them; the first that holds a name serves it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

from loratree.adapters.files import AdapterFile, read_adapter
from loratree.adapters.prefix_files import PEFT_TYPE, PrefixFile, read_prefix
from loratree.adapters.store import AdapterInfo
from loratree.errors import AdapterNotFoundError

__all__ = ["AdapterRead", "AdapterSource", "Sources", "parse_adapter"]



@dataclass(frozen=True)
class AdapterRead:
    """One version of an adapter, read and checked whole (without a model)."""

    name: str
    version: str
    """What was read: equal versions hold equal files."""
    path: Path
    """The directory it was read from (labels, ``routing.json``)."""
    lora: AdapterFile | None = None
    prefix: PrefixFile | None = None
    parent: str | None = None
    """A tree node's parent (store only): the file holds the node's own branch."""


class AdapterSource(Protocol):
    """A set of named adapters the server can read."""

    root: Path
    """The directory the names live under (kept out of error messages)."""

    def __contains__(self, name: object) -> bool: ...

    def version_of(self, name: str) -> str:
        """What ``name`` holds now, as a key that changes whenever its files do. Cheap:
        called on every request. Raises ``AdapterNotFoundError``."""
        ...

    def read(self, name: str) -> AdapterRead:
        """``name`` read whole at one version (never half of one). Raises
        ``AdapterNotFoundError`` or an ``AdapterFileError`` naming what is wrong."""
        ...

    def info(self, name: str) -> AdapterInfo: ...

    def list(self) -> list[AdapterInfo]:
        """Every adapter that reads, sorted by name."""
        ...


def parse_adapter(path: Path, raw: dict[str, Any], tensors: dict[str, Tensor] | None = None
                  ) -> AdapterFile | PrefixFile:
    """An adapter directory's files, checked: a prefix or a LoRA adapter by its config."""
    if raw.get("peft_type") == PEFT_TYPE:
        return read_prefix(path, raw, tensors)
    return read_adapter(path, raw, tensors)


class Sources:
    """Sources in order of precedence: a name is served by the first that holds it."""

    def __init__(self, sources: list[AdapterSource]) -> None:
        if not sources:
            raise ValueError("Sources needs at least one source")
        self.sources = list(sources)
        self.root = self.sources[0].root

    def source_of(self, name: str) -> AdapterSource:
        for source in self.sources:
            if name in source:
                return source
        raise AdapterNotFoundError(f"no adapter named {name!r}")

    def __contains__(self, name: object) -> bool:
        return any(name in s for s in self.sources)

    def version_of(self, name: str) -> str:
        return self.source_of(name).version_of(name)

    def read(self, name: str) -> AdapterRead:
        return self.source_of(name).read(name)

    def info(self, name: str) -> AdapterInfo:
        return self.source_of(name).info(name)

    def list(self) -> list[AdapterInfo]:
        seen: dict[str, AdapterInfo] = {}
        for source in self.sources:
            for info in source.list():
                seen.setdefault(info.name, info)
        return sorted(seen.values(), key=lambda i: i.name)

    def shadowed(self) -> list[tuple[str, AdapterSource, AdapterSource]]:
        """(name, the source serving it, a later source also holding it)."""
        first: dict[str, AdapterSource] = {}
        out = []
        for source in self.sources:
            for info in source.list():
                if info.name in first:
                    out.append((info.name, first[info.name], source))
                else:
                    first[info.name] = source
        return out
