"""Plain folders of PEFT adapters, served read-only by their path (``AdapterSource``).

Every directory under the root, at any depth, that holds ``adapter_config.json`` and
``adapter_model.safetensors`` is an adapter named by its path relative to the root
(``root/support/fr`` is ``support/fr``). Names are checked like the store's, hidden
directories are skipped, and a symlink on the way is refused (it could lead outside the
root). A name is looked up directly on each request, so a new directory is served on its
first request, without a scan or a restart.

A name's version is the identity of its two files: ``(st_dev, st_ino, st_mtime_ns,
st_size)`` of each, so an edit, a copy over it or a rename into place is seen on the next
request. Reading never serves half a file: both files are read into memory and stat'ed
again; if anything changed meanwhile, or the newest write is younger than ``SETTLE_NS``
(a same-size rewrite within one tick of the file-system clock leaves the stat unchanged),
they are read again, up to ``tries`` times. The bytes are then parsed and checked (never
mapped from the file, so a later rewrite cannot change what was read): a file caught
mid-write reads as truncated and fails the checks with an error that names it.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from loratree.adapters.node_files import TREE_NAME
from loratree.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME, parse_config
from loratree.adapters.prefix_files import PrefixFile
from loratree.adapters.safetensors_io import parse_safetensors
from loratree.adapters.source import AdapterRead, parse_adapter
from loratree.adapters.store import AdapterInfo, adapter_info, check_name, name_dir
from loratree.errors import (
    AdapterFileError,
    AdapterNameError,
    AdapterNotFoundError,
    UnsafeFormatError,
)

__all__ = ["SETTLE_NS", "FolderSource", "plain_dir", "plain_dirs"]

log = logging.getLogger(__name__)

SETTLE_NS = 20_000_000
"""Files written less than this long ago (20 ms) are read again after a pause."""
_FILES = (CONFIG_NAME, WEIGHTS_NAME)
Identity = tuple[tuple[int, int, int, int], ...]


def plain_dir(root: Path, name: str) -> Path | None:
    """``root/name`` if it is a PEFT adapter directory reached through plain directories.

    Raises:
        AdapterNameError: the name is malformed, or a symlink lies on its path.
    """
    d = name_dir(root, name)
    if d is None or not all(os.path.lexists(os.path.join(d, f)) for f in _FILES):
        return None
    return Path(d)


def plain_dirs(root: Path) -> Iterator[tuple[str, Path]]:
    """(name, directory) of every PEFT adapter directory under ``root``, sorted, skipping
    hidden directories, symlinks, names the store would refuse, and store entries (a
    directory holding the store's ``@`` link)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        entry = "@" in filenames or "@" in dirnames  # os.walk lists a link to a dir there
        if here == root or entry or not all(f in filenames for f in _FILES):
            continue
        name = here.relative_to(root).as_posix()
        try:
            check_name(name)
        except AdapterNameError as e:
            log.debug("skipping %s: %s", here, e)
            continue
        yield name, here


class FolderSource:
    """The PEFT adapter directories under ``root``, read-only."""

    def __init__(self, root: str | Path, *, tries: int = 20, pause_s: float = 0.01) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ValueError(f"adapters directory {root} does not exist")
        if tries < 1:
            raise ValueError(f"tries must be >= 1, got {tries}")
        self.tries, self.pause_s = tries, pause_s

    def __repr__(self) -> str:
        return f"FolderSource({str(self.root)!r})"

    def _dir(self, name: str) -> Path:
        path = plain_dir(self.root, name)
        if path is None:
            raise AdapterNotFoundError(f"no adapter named {name!r} in {self.root}")
        return path

    def __contains__(self, name: object) -> bool:
        try:
            return plain_dir(self.root, name) is not None  # type: ignore[arg-type]
        except AdapterNameError:
            return False

    def version_of(self, name: str) -> str:
        return _key(_identity(self._dir(name)))

    def read(self, name: str) -> AdapterRead:
        path = self._dir(name)
        if (path / TREE_NAME).exists():
            raise AdapterFileError(f"{name}: holds a tree node record ({TREE_NAME}); tree "
                                   "nodes are served from a store (loratree store add)")
        config, weights, identity = self._stable_bytes(name, path)
        raw = parse_config(config, name)
        adapter = parse_adapter(path, raw, parse_safetensors(weights, f"{name}/{WEIGHTS_NAME}"))
        if isinstance(adapter, PrefixFile):
            return AdapterRead(name, _key(identity), path, prefix=adapter)
        return AdapterRead(name, _key(identity), path, lora=adapter)

    def info(self, name: str) -> AdapterInfo:
        path = self._dir(name)
        return adapter_info(name, path, parse_config(_read_bytes(path / CONFIG_NAME), name))

    def list(self) -> list[AdapterInfo]:
        out = []
        for name, path in plain_dirs(self.root):
            try:
                out.append(adapter_info(name, path, parse_config(
                    _read_bytes(path / CONFIG_NAME), name)))
            except (AdapterFileError, OSError) as e:
                log.warning("adapters directory %s: %s is unreadable (%s); skipped",
                            self.root, name, e)
        return out

    def _stable_bytes(self, name: str, path: Path) -> tuple[bytes, bytes, Identity]:
        """Both files' bytes as of one identity that held before and after the read."""
        for attempt in range(self.tries):
            before = _identity(path)
            config, weights = (_read_bytes(path / f) for f in _FILES)
            after = _identity(path)
            newest = max(s[2] for s in after)
            if before == after and time.time_ns() - newest >= SETTLE_NS:
                return config, weights, after
            time.sleep(self.pause_s * (1 + attempt % 4))
        raise AdapterFileError(f"{name}: its files kept changing while being read "
                               f"({self.tries} tries); write them elsewhere and rename them "
                               "into place")


def _identity(path: Path) -> Identity:
    out = []
    for f in _FILES:
        try:
            s = os.lstat(path / f)
        except FileNotFoundError as e:
            raise AdapterFileError(f"{path.name}: {f} is missing") from e
        if not stat.S_ISREG(s.st_mode):
            raise UnsafeFormatError(f"{path.name}: {f} is not a regular file (a symlink?)")
        out.append((s.st_dev, s.st_ino, s.st_mtime_ns, s.st_size))
    return tuple(out)


def _key(identity: Identity) -> str:
    return "file:" + ";".join(":".join(map(str, s)) for s in identity)


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise AdapterFileError(f"{path.parent.name}: {path.name} is missing") from e
    except OSError as e:
        raise AdapterFileError(f"{path.parent.name}: cannot read {path.name}: "
                               f"{e.strerror or type(e).__name__}") from e
