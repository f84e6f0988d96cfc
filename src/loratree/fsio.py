"""Durable, atomic file-system writes: a reader sees the old file or the new one, never half."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["atomic_dir", "atomic_write", "fsync_dir", "fsync_tree"]


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` via ``write(tmp_path)``: temp file, fsync, rename, fsync of the dir."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build the directory ``path`` in a temp directory beside it (yielded), then publish it
    whole: fsync every file, rename it into place, fsync the parent. An existing ``path``
    is set aside only once the new one is complete, and removed after the rename. On an
    error the temp directory is removed and ``path`` is left as it was.

    The temp directory is ``.<name>.<hex>.tmp`` (hidden, and recognisable by a cleanup
    that globs ``.<name>*.tmp``); it is made with ``mkdir``, so it gets the umask's mode
    like any directory, not ``mkdtemp``'s 0700.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex
    tmp = path.with_name(f".{path.name}.{tag}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        old = path.with_name(f".{path.name}.{tag}.old") if path.exists() else None
        if old is not None:
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            if old is not None:  # put the previous directory back rather than lose both
                os.rename(old, path)
            raise
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under ``root`` (before renaming it into place)."""
    root = Path(root)
    for f in root.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        fsync_dir(d)
