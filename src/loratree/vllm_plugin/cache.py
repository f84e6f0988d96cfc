"""Store adapters materialised for vLLM: one PEFT directory per content version.

vLLM loads an adapter from a directory path. A store name's current version is a
directory too, but a tree node is several of them (its path) and must be composed first,
and a replaced version is deleted after the store's grace period while vLLM may reload it
later (after evicting it from its own CPU cache). So every served name is composed once
and written here, keyed by the content of its whole path (``tree.nodes.path_hash``): a
name whose path did not change reuses its entry, a replaced adapter (or ancestor) gets a
new one, and an entry never changes once written.

Layout under the cache root::

    v1-<path hash>/adapter_config.json, adapter_model.safetensors, loratree-vllm.json

An entry is built in a temp directory beside it, its manifest (the sha256 of each file)
written last, every file fsynced, then renamed into place whole, so vLLM never reads a
half-written entry. Before an entry is handed out it is checked against its manifest: a
damaged one (a file changed, truncated or missing) is refused, never served, and stays
for the operator to look at; deleting it makes the next request rebuild it. Handing an
entry out marks its manifest's mtime, so ``prune.prune_cache`` (``loratree vllm-cache
prune``) can delete entries that no name holds any more and nobody has used for a while.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from loratree.adapters import AdapterFile, AdapterStore
from loratree.adapters.files import write_adapter_file
from loratree.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME
from loratree.errors import AdapterFileError, AdapterNotFoundError, TreeError
from loratree.fsio import fsync_dir, fsync_tree
from loratree.tree import nodes
from loratree.vllm_plugin.servable import (
    DamagedEntryError,
    adapter_rank,
    check_servable,
    compose_for_vllm,
)

__all__ = ["ENTRY_FORMAT", "MANIFEST", "Materialised", "MaterialisedCache"]

log = logging.getLogger(__name__)

MANIFEST = "loratree-vllm.json"
ENTRY_FORMAT = 1
_FILES = (CONFIG_NAME, WEIGHTS_NAME)


@dataclass(frozen=True)
class Materialised:
    """One store name, ready for vLLM."""

    name: str
    path: Path
    """The entry's directory: a plain PEFT LoRA adapter."""
    key: str
    """The content hash of the name's whole path (in the entry's directory name)."""
    rank: int
    """The largest rank over its modules (what ``--max-lora-rank`` must cover)."""


class MaterialisedCache:
    """Composes and writes store adapters for vLLM under ``root``, once per content version.

    Entries are content-addressed, so one cache may serve several stores and processes.
    """

    def __init__(self, store: AdapterStore, root: str | Path) -> None:
        self.store = store
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.built = 0
        """How many entries this instance wrote (the rest were found on disk)."""

    def get(self, name: str) -> Materialised:
        """``name`` as a checked PEFT directory, built on first use of its content version.

        Raises:
            AdapterNotFoundError, AdapterNameError: no such adapter in the store.
            RefusedError: vLLM must not serve it (prefix, stale node, damaged, unsupported).
        """
        check_servable(self.store, name)
        try:
            key = nodes.path_hash(self.store, name)
        except (OSError, AdapterFileError, TreeError, AdapterNotFoundError) as e:
            raise DamagedEntryError(f"adapter {name!r} cannot be read from the store ({e})"
                                    ) from e
        entry = self.root / f"v{ENTRY_FORMAT}-{key}"  # a new format never reads an old entry
        if not entry.exists():
            self._build(entry, name, key, compose_for_vllm(self.store, name))
        manifest = self._check(entry, name, key)
        with contextlib.suppress(OSError):  # last used, for prune_cache (a read-only cache
            os.utime(entry / MANIFEST)     # is served, never pruned by age)
        return Materialised(name, entry, key, manifest["rank"])

    def _build(self, entry: Path, name: str, key: str, adapter: AdapterFile) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=self.root))
        try:
            write_adapter_file(adapter, tmp)
            manifest = {"format": ENTRY_FORMAT, "name": name, "key": key,
                        "rank": adapter_rank(adapter),
                        "files": {f: _sha256(tmp / f) for f in _FILES}}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            tmp.chmod(0o755)  # mkdtemp makes 0700
            fsync_tree(tmp)
            try:
                os.rename(tmp, entry)
            except OSError:
                if not entry.is_dir():
                    raise
                # another process published this content version first; _check reads it
                log.info("vLLM cache entry %s was written by another process", entry.name)
                return
            fsync_dir(self.root)
            self.built += 1
            log.info("materialised %r for vLLM at %s", name, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _check(self, entry: Path, name: str, key: str) -> dict:
        """The entry's manifest, once every file matches it; else ``DamagedEntryError``."""
        problem = _problem(entry, key)
        if problem is not None:
            raise DamagedEntryError(
                f"the vLLM cache entry of {name!r} is damaged ({problem}); it is not served. "
                f"Delete the directory {entry.name} under the cache "
                "(LORATREE_VLLM_CACHE) and the next request rebuilds it from the store")
        return json.loads((entry / MANIFEST).read_text())


def _problem(entry: Path, key: str) -> str | None:
    """What is wrong with a cache entry, or None when it matches its manifest."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"its manifest cannot be read: {type(e).__name__}"
    if not isinstance(manifest, dict) or manifest.get("key") != key:
        return "its manifest is for another content version"
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != set(_FILES):
        return "its manifest does not list the adapter files"
    if not isinstance(manifest.get("rank"), int):
        return "its manifest has no rank"
    for f, digest in files.items():
        try:
            found = _sha256(entry / f)
        except OSError:
            return f"{f} is missing"
        if found != digest:
            return f"{f} differs from what was written"
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
