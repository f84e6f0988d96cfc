"""A directory of named adapters: safe names, atomic adds and replaces, metadata listing.

Layout under the store root::

    .objects/<id>/adapter_config.json, adapter_model.safetensors   one immutable version
    .objects/<id>/loratree_manifest.json     each file's sha256 and size, written at add
    <name>/@  -> ../.objects/<id>                                   a relative symlink

A name may hold ``/`` (tree paths: ``support/fr/acme``), and every part of it is a plain
directory, so ``support`` and ``support/fr`` can both be adapters: each directory's ``@``
link is its own adapter (``@`` cannot appear in a name, so it never collides with a
child). Adding writes a new version under ``.objects``, fsyncs it, then swaps the name's
``@`` link with one atomic rename: a reader that resolves the name sees the old version or
the new one, whole, never a half-written directory and never a gap. A replaced version is
deleted only after ``GRACE_S``, so a reader midway through it can finish. (Stores written
before trees used a link at ``<name>`` itself; those are still read, and turned into the
directory form when a name below them is added.)

Names are checked before any path is built from them (letters, digits, ``-``, ``_``,
``.``, ``/`` between parts; no empty, ``.`` or ``..`` part, no leading dot, at most
``MAX_NAME`` characters), and every resolved path must stay inside ``.objects``: a
symlink planted in the store that leads elsewhere is refused, not followed.

Damage at rest (a file changed, truncated, removed or swapped for a symlink after the add;
a version directory deleted) is contained to its entry: ``scan`` names it with cheap checks,
``check`` reports every problem against the hashes recorded at add (``store_check``), a
load through ``checked_path`` raises ``DamagedAdapterError``, and listing, adding and
removing other names, and re-adding or removing the damaged one, keep working.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from loratree.adapters.card_files import check_card
from loratree.adapters.files import check_adapter_dir, save_adapter
from loratree.adapters.node_files import check_node, version_record
from loratree.adapters.peft_format import CONFIG_NAME, read_config
from loratree.adapters.prefix_files import PEFT_TYPE
from loratree.adapters.store_check import (
    FILES,
    LINK,
    Problem,
    ProblemKind,
    check_link,
    check_version,
    write_manifest,
)
from loratree.errors import (
    AdapterConfigError,
    AdapterFileError,
    AdapterInUseError,
    AdapterNameError,
    AdapterNotFoundError,
    DamagedAdapterError,
)
from loratree.fsio import atomic_dir, fsync_dir

__all__ = ["FILES", "MAX_NAME", "AdapterInfo", "AdapterStore", "DamagedEntry", "Problem",
           "ProblemKind", "adapter_info", "check_name", "name_dir"]

log = logging.getLogger(__name__)

MAX_NAME = 200
OBJECTS = ".objects"
GRACE_S = 60.0
"""How long a replaced version stays readable for readers that resolved it before."""
_PART = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")


def check_name(name: object) -> str:
    """Return ``name`` if it is a valid adapter name; raise ``AdapterNameError`` if not."""
    if not isinstance(name, str):
        raise AdapterNameError(f"adapter name must be a string, got {type(name).__name__}")
    if not name:
        raise AdapterNameError("adapter name is empty")
    if len(name) > MAX_NAME:
        raise AdapterNameError(f"adapter name is longer than {MAX_NAME} characters")
    for part in name.split("/"):
        if part in ("", ".", ".."):
            raise AdapterNameError(f"adapter name {name!r}: empty, '.' or '..' part")
        if not _PART.fullmatch(part):
            raise AdapterNameError(
                f"adapter name {name!r}: parts take letters, digits, '-', '_' and '.', and "
                "do not start with '.'")
    return name


def name_dir(root: str | Path, name: str) -> str | None:
    """``root/name`` when every part of the way is a plain directory; None when a part is
    missing or not a directory. Never follows a link: one in place of a directory is
    refused (``AdapterNameError``). One ``lstat`` per part (the serving hot path)."""
    d = str(root)
    for part in check_name(name).split("/"):
        d = os.path.join(d, part)
        try:
            mode = os.lstat(d).st_mode
        except OSError:
            return None
        if stat.S_ISLNK(mode):
            raise AdapterNameError(f"adapter {name!r}: {part!r} on its path is a link, "
                                   "not a directory; refused")
        if not stat.S_ISDIR(mode):
            return None
    return d


@dataclass(frozen=True)
class AdapterInfo:
    """What the store knows about one adapter, from its config and files."""

    name: str
    kind: str
    """"lora" or "prefix"."""
    rank: int
    """LoRA: the largest rank over its layers; prefix: the number of virtual tokens."""
    targets: tuple[str, ...]
    size: int
    """Bytes on disk."""
    base_model: str | None
    path: Path
    """The immutable version directory the name pointed to when this was read."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "rank": self.rank,
                "targets": list(self.targets), "size": self.size,
                "base_model": self.base_model}


@dataclass(frozen=True)
class DamagedEntry:
    """A name whose current version cannot be read (its files changed or broke after it
    was added). It stays in the store, untouched, until it is replaced or removed."""

    name: str
    problem: str
    problems: tuple[Problem, ...] = ()
    """What the cheap checks found (empty when the entry failed to read otherwise)."""

    @property
    def fix(self) -> str:
        if self.problems:
            return self.problems[0].fix
        return (f"replace it with `loratree store add {self.name} DIR` (a good copy), or "
                f"delete it with `loratree store remove {self.name}`")


class AdapterStore:
    """Named adapters under one root directory (created if missing)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.objects = self.root / OBJECTS
        self.objects.mkdir(parents=True, exist_ok=True)

    def path_of(self, name: str) -> Path:
        """The version directory ``name`` points to now.

        Raises:
            AdapterNameError: the name is malformed, or a part of its path is a link.
            AdapterNotFoundError: no adapter of that name.
            DamagedAdapterError: the name's link leads outside the store, or to nothing.
        """
        link = self._link(name)
        if link is None:
            raise AdapterNotFoundError(f"no adapter named {name!r} in {self.root}")
        # the parts on the way are real directories: only the link is followed
        target, problems = check_link(name, link, self.objects)
        if target is None:
            raise _damaged(name, problems)
        return target

    def checked_path(self, name: str) -> Path:
        """``path_of``, after checking the version's files against the hashes recorded at
        add (reads them in full: for a load, which reads them next anyway).

        Raises:
            DamagedAdapterError: naming every problem found, and the fix.
        """
        path = self.path_of(name)
        problems = [p for p in _checked(name, path, deep=True, parse=False) if p.damaged]
        if problems:
            raise _damaged(name, problems)
        return path

    def _link(self, name: str) -> str | None:
        """The link that names ``name``'s version, or None. Never follows a link on the
        way: a planted link in place of a directory is refused. (This is the serving hot
        path: one lstat per part.)"""
        d = name_dir(self.root, name)
        if d is None:
            return None
        link = os.path.join(d, LINK)
        return link if os.path.islink(link) else None

    def __contains__(self, name: object) -> bool:
        """Whether the store has an entry ``name``, readable or damaged (a damaged entry
        stays until it is replaced or removed)."""
        try:
            return self._link(name) is not None  # type: ignore[arg-type]
        except AdapterNameError:
            return False

    def info(self, name: str) -> AdapterInfo:
        path = self.path_of(name)
        return _info(name, path, read_config(path))

    def names(self) -> list[str]:
        """Every name that has a current version, readable or not, sorted."""
        found = []
        for dirpath, dirnames, _ in os.walk(self.root):
            here = Path(dirpath)
            rel = here.relative_to(self.root)
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            if str(rel) != "." and os.path.islink(here / LINK):
                found.append(rel.as_posix())
        return sorted(found)

    def scan(self) -> tuple[list[AdapterInfo], list[DamagedEntry]]:
        """Every adapter that reads, and every entry that does not (with what is wrong):
        one damaged entry never hides the others. Cheap: the checks that read a few
        hundred bytes per entry, no hashing (``check`` does that)."""
        good, bad = [], []
        for name in self.names():
            damage = [p for p in self._problems(name, deep=False) if p.damaged]
            if damage:
                bad.append(DamagedEntry(name, "; ".join(f"{p.file}: {p.detail}"
                                                        for p in damage), tuple(damage)))
                continue
            try:
                good.append(self.info(name))
            except (AdapterNameError, AdapterNotFoundError, AdapterFileError) as e:
                bad.append(DamagedEntry(name, str(e)))
        return good, bad

    def check(self, name: str | None = None) -> list[Problem]:
        """Every problem of ``name`` (or of every entry), cheap checks first, then each
        file's sha256 against the manifest recorded at add and a full read of the adapter.
        Warnings (``Problem.damaged`` false) are included.

        Raises:
            AdapterNotFoundError: ``name`` is given and the store has no such entry.
        """
        if name is not None and name not in self:
            raise AdapterNotFoundError(f"no adapter named {name!r} in {self.root}")
        names = self.names() if name is None else [name]
        return [p for n in names for p in self._problems(n, deep=True)]

    def _problems(self, name: str, *, deep: bool) -> list[Problem]:
        try:
            link = self._link(name)
        except AdapterNameError as e:
            return [Problem(name, LINK, ProblemKind.NAME_INVALID, str(e))]
        if link is None:
            return []
        version, problems = check_link(name, link, self.objects)
        if version is None:
            return problems
        return _checked(name, version, deep=deep, parse=deep)

    def list(self) -> list[AdapterInfo]:
        """Every adapter that reads, sorted by name; a damaged entry is logged (with the
        command that fixes it) and left out."""
        good, bad = self.scan()
        for entry in bad:
            log.warning("store %s: entry %r is damaged (%s); %s", self.root, entry.name,
                        entry.problem, entry.fix)
        return good

    def add(self, name: str, source: str | Path) -> AdapterInfo:
        """Copy the adapter directory ``source`` in as ``name`` (replacing any old one).

        The files are checked (readable config and safetensors) before anything becomes
        visible under the name.
        """
        check_name(name)
        source = Path(source)
        check_node(name, source, check_adapter_dir(source))
        check_card(source, name)
        version = self.objects / uuid.uuid4().hex
        with atomic_dir(version) as tmp:
            for f in FILES:
                if (source / f).is_file():
                    shutil.copyfile(source / f, tmp / f)
            write_manifest(tmp)
        return self._point(name, version)

    def save(self, name: str, model: nn.Module, slot: int = 0, **kw: Any) -> AdapterInfo:
        """Save slot ``slot`` of ``model`` into the store as ``name``."""
        check_name(name)
        staging = self.objects / f".tmp-{uuid.uuid4().hex}"
        try:
            save_adapter(model, staging, slot, **kw)
            return self.add(name, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def remove(self, name: str) -> None:
        """Delete ``name`` (its version directory goes after the grace period). A tree node
        with children is refused: remove the children first. A damaged entry is removed
        like any other."""
        link = self._link(name)
        if link is None:
            raise AdapterNotFoundError(f"no adapter named {name!r} in {self.root}")
        kids = self.children(name)
        if kids:
            raise AdapterInUseError(f"{name!r} is the parent of {', '.join(kids)}; remove "
                                    "those first")
        os.unlink(link)
        fsync_dir(os.path.dirname(link))
        d = self.root / name
        while d != self.root:  # drop directories left empty
            try:
                d.rmdir()
            except OSError:
                break
            d = d.parent
        self.collect()

    def children(self, name: str) -> list[str]:
        """The stored nodes whose tree record names ``name`` as their parent (a node's
        directory holds its children's, so only ``name``'s own subdirectories can). A
        damaged entry there whose record cannot be read counts: it may be a child."""
        d = self.root / name
        if not d.is_dir() or d.is_symlink():
            return []
        kids = []
        for sub in sorted(d.iterdir()):
            child = f"{name}/{sub.name}"
            if sub.name.startswith(".") or not sub.is_dir() or child not in self:
                continue
            try:
                record = version_record(self.path_of(child))
            except (AdapterFileError, ValueError):
                kids.append(f"{child} (damaged)")
                continue
            if record is not None and record.parent == name:
                kids.append(child)
        return kids

    def _point(self, name: str, version: Path) -> AdapterInfo:
        d = self.root
        for part in name.split("/"):  # never follow a planted link out of the store
            d = d / part
            if os.path.islink(d):
                shutil.rmtree(version, ignore_errors=True)
                raise AdapterNameError(f"adapter {name!r}: {part!r} on its path is not a "
                                       "plain directory of the store")
            if d.exists() and not d.is_dir():
                shutil.rmtree(version, ignore_errors=True)
                raise AdapterNameError(f"adapter {name!r}: {part!r} on its path is a file")
            d.mkdir(exist_ok=True)
        tmp_link = d / f".{LINK}.{version.name}.tmp"
        os.symlink(os.path.relpath(version, d), tmp_link)
        os.replace(tmp_link, d / LINK)  # atomic: readers see the old version or the new one
        fsync_dir(d)
        self.collect()
        return self.info(name)

    def collect(self, grace_s: float | None = None) -> int:
        """Delete versions no name points to, once older than ``grace_s`` (default
        ``GRACE_S``), so a reader that resolved a name just before it was replaced can
        still finish reading. Returns how many were deleted."""
        grace = GRACE_S if grace_s is None else grace_s
        live = set()
        for name in self.names():  # damaged entries' versions are kept too
            link = self.root / name / LINK
            live.add(os.path.basename(os.path.normpath(os.readlink(link))))
        now, removed = time.time(), 0
        for version in self.objects.iterdir():
            if version.name in live or version.name.startswith("."):  # being written
                continue
            if now - version.lstat().st_mtime >= grace:
                shutil.rmtree(version, ignore_errors=True)
                removed += 1
        return removed


def _checked(name: str, version: Path, *, deep: bool, parse: bool) -> list[Problem]:
    """``check_version``; a version that cannot be read at all (no permission, or changed
    while it was read) is one problem, not an error that stops a listing."""
    try:
        return check_version(name, version, hashes=deep, parse=parse)
    except OSError as e:
        return [Problem(name, ".", ProblemKind.UNREADABLE,
                        f"cannot read its version: {e.strerror or type(e).__name__}")]


def _damaged(name: str, problems: list[Problem]) -> DamagedAdapterError:
    what = "; ".join(f"{p.file}: {p.detail}" for p in problems)
    return DamagedAdapterError(f"adapter {name!r} is damaged in the store ({what}); fix: "
                               f"{problems[0].fix}")


def _info(name: str, path: Path, raw: dict[str, Any]) -> AdapterInfo:
    size = sum((path / f).stat().st_size for f in FILES if (path / f).is_file())
    base = raw.get("base_model_name_or_path")
    if raw.get("peft_type") == PEFT_TYPE:
        n = raw.get("num_virtual_tokens", 0)
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise AdapterConfigError(f"adapter {name!r}: {CONFIG_NAME} has num_virtual_tokens "
                                     f"{n!r}, not a non-negative integer")
        return AdapterInfo(name, "prefix", n, (), size, base, path)
    pattern = raw.get("rank_pattern") or {}
    ranks = [raw.get("r", 0), *(pattern.values() if isinstance(pattern, dict) else [pattern])]
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ranks):
        raise AdapterConfigError(f"adapter {name!r}: {CONFIG_NAME} has a rank that is not a "
                                 f"non-negative integer (r={raw.get('r')!r}, rank_pattern="
                                 f"{pattern!r})")
    targets = raw.get("target_modules") or ()
    targets = (targets,) if isinstance(targets, str) else tuple(map(str, targets))
    return AdapterInfo(name, "lora", max(ranks), targets, size, base, path)


def adapter_info(name: str, path: Path, raw: dict[str, Any]) -> AdapterInfo:
    """What ``AdapterStore.info`` says, for an adapter directory outside a store whose
    config ``raw`` is already read (``adapters.folder_source``)."""
    return _info(name, path, raw)
