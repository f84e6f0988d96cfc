"""Damage at rest in a store version: the manifest written at add, and the checks against it.

Every version directory holds ``loratree_manifest.json``, written inside the same atomic
add as the adapter's files: ``{"files": {file: {"sha256": hex, "size": bytes}}}`` for each
file of the version. It is not a PEFT file (PEFT and vLLM read the directory and ignore
it). A check compares what is on disk with it, cheapest first:

1. the name's ``@`` link leads to a directory inside ``.objects`` (not elsewhere, not gone);
2. the version directory holds regular files only, no symlinks, nothing the manifest does
   not list, and every file it lists, at the recorded size;
3. the config parses and its values are valid; the weights' safetensors header fits the
   file (not truncated) and its shapes agree with the config's ranks;
4. (``hashes``) each file's sha256 matches the manifest: this catches bytes changed in
   place, NaN written into the weights, a file swapped for another of the same size;
5. (``parse``) the whole adapter reads as ``check_adapter_dir`` reads it (non-finite
   values, keys that are not LoRA tensors, a malformed tree or routing record).

Steps 1-3 read a few hundred bytes per version (``AdapterStore.scan`` runs them); 4 and 5
read every file in full. A version written before manifests were recorded is reported
with a warning (``NO_RECORDED_HASH``), not as damage; re-adding it records one.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from loratree.adapters.card_files import CARD_NAME
from loratree.adapters.files import check_adapter_dir
from loratree.adapters.node_files import TREE_NAME, read_record
from loratree.adapters.peft_format import (
    CONFIG_NAME,
    MAX_CONFIG_BYTES,
    WEIGHTS_NAME,
    config_from_peft,
    parse_key,
)
from loratree.adapters.prefix_files import KEY as PREFIX_KEY
from loratree.adapters.prefix_files import PEFT_TYPE, check_prefix_config
from loratree.adapters.routing_files import ROUTING_NAME, read_centroid
from loratree.adapters.safetensors_io import read_header
from loratree.errors import AdapterFileError, CorruptFileError, NonFiniteError, ShapeMismatchError
from loratree.fsio import atomic_write
from loratree.surgery.targets import pattern_value

__all__ = ["FILES", "MANIFEST_NAME", "Problem", "ProblemKind", "check_link", "check_version",
           "write_manifest"]

MANIFEST_NAME = "loratree_manifest.json"
FILES = (CONFIG_NAME, WEIGHTS_NAME, ROUTING_NAME, TREE_NAME, CARD_NAME)
"""What a version holds besides its manifest: the PEFT files, and loratree's routing
centroid, tree node record and chat-app card when present."""
REQUIRED = (CONFIG_NAME, WEIGHTS_NAME)
LINK = "@"
_CHUNK = 1 << 20


class ProblemKind(StrEnum):
    """What is wrong with a stored entry (each kind's fix: ``Problem.fix``)."""

    NAME_INVALID = "name_invalid"
    """A directory in the store holds an ``@`` link but its path is not a valid name."""
    DANGLING_LINK = "dangling_link"
    """The name's ``@`` link leads to a version directory that is gone (or not a dir)."""
    SYMLINK_ESCAPES = "symlink_escapes"
    """The name's ``@`` link leads outside ``.objects``: refused, never followed."""
    SYMLINK_PLANTED = "symlink_planted"
    """A symlink sits in the version (in place of a file, or as the version directory)."""
    NOT_A_FILE = "not_a_file"
    """A directory, fifo or device where a file should be."""
    UNREADABLE = "unreadable"
    """The version or one of its files cannot be read (no permission, an I/O error)."""
    MISSING_FILE = "missing_file"
    UNEXPECTED_FILE = "unexpected_file"
    """A file the manifest does not list (or, with no manifest, not an adapter file)."""
    MANIFEST_INVALID = "manifest_invalid"
    NO_RECORDED_HASH = "no_recorded_hash"
    """A warning, not damage: the version predates manifests."""
    SIZE_MISMATCH = "size_mismatch"
    CONFIG_NOT_JSON = "config_not_json"
    CONFIG_INVALID = "config_invalid"
    WEIGHTS_TRUNCATED = "weights_truncated"
    """The safetensors header does not fit the file: cut short, or not safetensors."""
    WEIGHTS_SHAPE = "weights_shape"
    """A tensor's shape disagrees with the config's rank or with its other half."""
    HASH_MISMATCH = "hash_mismatch"
    WEIGHTS_NON_FINITE = "weights_non_finite"
    CONTENT_INVALID = "content_invalid"
    """The adapter does not read whole (a problem the other kinds do not name)."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one entry of a store."""

    name: str
    file: str
    """The file within the version (``@`` for the name's link, ``.`` for the version)."""
    kind: ProblemKind
    detail: str

    @property
    def damaged(self) -> bool:
        """Whether this is damage (the entry cannot be trusted) rather than a warning."""
        return self.kind not in (ProblemKind.NO_RECORDED_HASH,)

    @property
    def fix(self) -> str:
        if self.kind == ProblemKind.NO_RECORDED_HASH:
            return (f"re-add it to record one: `loratree store add {self.name} "
                    f"STORE/{self.name}/@` copies it in place")
        if self.kind == ProblemKind.NAME_INVALID:
            return "rename or delete that directory by hand"
        return (f"replace it with `loratree store add {self.name} DIR` (a good copy), or "
                f"delete it with `loratree store remove {self.name}`")

    def __str__(self) -> str:
        return f"{self.name}: {self.file}: {self.kind}: {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "file": self.file, "kind": str(self.kind),
                "detail": self.detail, "damaged": self.damaged, "fix": self.fix}


def write_manifest(version: Path) -> None:
    """Record the size and sha256 of every adapter file in ``version`` (a directory being
    built, before it is published)."""
    files = {f: {"sha256": _sha256(version / f), "size": (version / f).stat().st_size}
             for f in FILES if (version / f).is_file()}
    text = json.dumps({"files": files}, indent=2, sort_keys=True) + "\n"
    atomic_write(version / MANIFEST_NAME, lambda p: p.write_text(text, encoding="utf-8"))


def check_link(name: str, link: str, objects: Path) -> tuple[Path | None, list[Problem]]:
    """The version directory the link ``link`` of ``name`` leads to, or None with the
    problem: it leads outside ``objects``, to a symlink, or to nothing."""
    target = Path(os.path.normpath(os.path.join(os.path.dirname(link), os.readlink(link))))
    if target.parent != objects or os.path.islink(objects):
        return None, [Problem(name, LINK, ProblemKind.SYMLINK_ESCAPES,
                              f"its link leads outside the store's versions, to {target}; "
                              "refused")]
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and stat.S_ISLNK(mode):
        return None, [Problem(name, ".", ProblemKind.SYMLINK_PLANTED,
                              f"its version {target.name} is a symlink, not a directory")]
    if mode is None or not stat.S_ISDIR(mode):
        return None, [Problem(name, LINK, ProblemKind.DANGLING_LINK,
                              f"its version directory {target.name} is missing")]
    return target, []


def check_version(name: str, version: Path, *, hashes: bool, parse: bool) -> list[Problem]:
    """Every problem of the version directory ``version`` of ``name``, cheap checks first;
    ``hashes`` and ``parse`` add the checks that read every file in full."""
    problems: list[Problem] = []
    regular = _listing(name, version, problems)
    manifest = _manifest(name, version, regular, problems)
    expected = set(manifest) if manifest is not None else set(REQUIRED)
    listed = set(manifest) if manifest is not None else set(FILES)
    for f in sorted(regular - listed):
        problems.append(Problem(name, f, ProblemKind.UNEXPECTED_FILE,
                                "not a file of this version as it was added"))
    for f in sorted(expected - regular - _irregular(version)):
        problems.append(Problem(name, f, ProblemKind.MISSING_FILE, "missing"))
    sized = set()
    for f, rec in (manifest or {}).items():
        if f in regular:
            size = (version / f).stat().st_size
            if size != rec["size"]:
                problems.append(Problem(name, f, ProblemKind.SIZE_MISMATCH,
                                        f"{size:,} bytes, {rec['size']:,} when added"))
            else:
                sized.add(f)
    problems += _contents(name, version, regular)
    cheap_ok = not any(p.damaged for p in problems)
    if hashes and manifest is not None:
        for f in sorted(sized):
            if _sha256(version / f) != manifest[f]["sha256"]:
                problems.append(Problem(name, f, ProblemKind.HASH_MISMATCH,
                                        "content differs from what was added (sha256)"))
    if parse and cheap_ok:  # a cheap problem would only be met again
        problems += _parse(name, version)
    return problems


def _listing(name: str, version: Path, problems: list[Problem]) -> set[str]:
    """The regular files of ``version``; symlinks and other non-files become problems."""
    regular = set()
    for entry in sorted(os.scandir(version), key=lambda e: e.name):
        if entry.is_symlink():
            problems.append(Problem(name, entry.name, ProblemKind.SYMLINK_PLANTED,
                                    f"a symlink (to {os.readlink(entry.path)}), not a file; "
                                    "never followed"))
        elif not entry.is_file(follow_symlinks=False):
            problems.append(Problem(name, entry.name, ProblemKind.NOT_A_FILE,
                                    "not a regular file"))
        else:
            regular.add(entry.name)
    return regular


def _irregular(version: Path) -> set[str]:
    """Names in ``version`` that exist but are not regular files (reported already)."""
    return {e.name for e in os.scandir(version) if not e.is_file(follow_symlinks=False)}


def _manifest(name: str, version: Path, regular: set[str], problems: list[Problem]
              ) -> dict[str, dict[str, Any]] | None:
    """The manifest's files, or None when there is none (a warning) or it is unreadable."""
    if MANIFEST_NAME not in regular:
        if MANIFEST_NAME not in _irregular(version):
            problems.append(Problem(name, MANIFEST_NAME, ProblemKind.NO_RECORDED_HASH,
                                    "no recorded hash (added before hashes were recorded)"))
        return None
    regular.discard(MANIFEST_NAME)
    path = version / MANIFEST_NAME
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"over {MAX_CONFIG_BYTES} bytes")
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        if not (isinstance(files, dict) and all(
                f in FILES and isinstance(r, dict) and isinstance(r.get("sha256"), str)
                and type(r.get("size")) is int for f, r in files.items())):
            raise ValueError("not a map of adapter files to their sha256 and size")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        problems.append(Problem(name, MANIFEST_NAME, ProblemKind.MANIFEST_INVALID,
                                f"unreadable ({e}); the files cannot be checked against it"))
        return None
    return files


def _contents(name: str, version: Path, regular: set[str]) -> list[Problem]:
    """The config's values and the weights' header (a few hundred bytes each)."""
    problems, raw, config = [], None, None
    if CONFIG_NAME in regular:
        try:
            raw, config = _config(version / CONFIG_NAME)
        except _NotJson as e:
            problems.append(Problem(name, CONFIG_NAME, ProblemKind.CONFIG_NOT_JSON, str(e)))
        except (ValueError, TypeError) as e:
            problems.append(Problem(name, CONFIG_NAME, ProblemKind.CONFIG_INVALID, str(e)))
    if WEIGHTS_NAME not in regular:
        return problems
    try:
        header = read_header(version / WEIGHTS_NAME)
    except CorruptFileError as e:
        return [*problems, Problem(name, WEIGHTS_NAME, ProblemKind.WEIGHTS_TRUNCATED,
                                   _detail(e, WEIGHTS_NAME))]
    if raw is None or raw.get("target_parameters"):  # experts' ranks share one dim
        return problems
    shapes = {k: v.get("shape") for k, v in header.items()
              if k != "__metadata__" and isinstance(v, dict)}
    wrong = (_prefix_shape(raw, shapes) if raw.get("peft_type") == PEFT_TYPE
             else _rank_shapes(config, shapes))
    if wrong is not None:
        problems.append(Problem(name, WEIGHTS_NAME, ProblemKind.WEIGHTS_SHAPE, wrong))
    return problems


class _NotJson(ValueError):
    pass


def _config(path: Path) -> tuple[dict[str, Any], Any]:
    """The raw config and its parsed form (a ``LoraConfig``, or a prefix's positions).

    Raises:
        _NotJson: the file is not a small JSON object.
        ValueError: a value is invalid (``AdapterConfigError`` names it).
    """
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise _NotJson(f"over {MAX_CONFIG_BYTES} bytes")
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _NotJson(f"not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise _NotJson("not a JSON object")
    if raw.get("peft_type") == PEFT_TYPE:
        return raw, check_prefix_config(CONFIG_NAME, raw)
    return raw, config_from_peft(raw)


def _rank_shapes(config: Any, shapes: dict[str, Any]) -> str | None:
    """What disagrees between LoRA tensor shapes and the ranks the config gives, if any:
    A is (r, in...), B is (out, r, ...)."""
    for key, shape in shapes.items():
        parsed = parse_key(key)
        if parsed is None or parsed[1] not in ("a", "b"):
            continue
        module, part = parsed
        want = int(pattern_value(config.rank_pattern, module, config.rank))
        if not isinstance(shape, list) or len(shape) < 2:
            return f"{key!r} has shape {shape}; LoRA factors have two dims or more"
        got = shape[0] if part == "a" else shape[1]
        if got != want:
            return f"{key!r} has shape {tuple(shape)}: rank {got}, the config says {want}"
    return None


def _prefix_shape(raw: dict[str, Any], shapes: dict[str, Any]) -> str | None:
    want = [raw["num_virtual_tokens"], raw["num_layers"] * 2 * raw["token_dim"]]
    if set(shapes) != {PREFIX_KEY} or shapes[PREFIX_KEY] != want:
        return f"holds {shapes}, the config says {{{PREFIX_KEY!r}: {want}}}"
    return None


def _parse(name: str, version: Path) -> list[Problem]:
    """Read the whole adapter as loading does; the first problem it meets, if any."""
    problems = []
    try:
        check_adapter_dir(version)
    except (AdapterFileError, ValueError) as e:
        kind = (ProblemKind.WEIGHTS_NON_FINITE if isinstance(e, NonFiniteError) else
                ProblemKind.WEIGHTS_SHAPE if isinstance(e, ShapeMismatchError) else
                ProblemKind.CONTENT_INVALID)
        problems.append(Problem(name, WEIGHTS_NAME, kind, _detail(e, version.name,
                                                          WEIGHTS_NAME)))
    for f, read in ((TREE_NAME, read_record), (ROUTING_NAME, read_centroid)):
        try:
            read(version)
        except (AdapterFileError, ValueError) as e:
            problems.append(Problem(name, f, ProblemKind.CONTENT_INVALID,
                                    _detail(e, version.name, str(version / f))))
    return problems


def _detail(e: Exception, *labels: str) -> str:
    """The error's message without the file or version name it starts with (the problem
    names both already)."""
    text = str(e)
    head, sep, rest = text.partition(": ")
    return rest if sep and head in labels else text


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()
