"""Damage at rest, done to a store the way a disk, a script or a person does it: one entry
per kind of damage, and what ``AdapterStore.check`` must report for each."""

import json
import os
import shutil
import struct
from pathlib import Path

from loratree.adapters import AdapterStore
from loratree.adapters.store_check import MANIFEST_NAME
from loratree.adapters.store_check import ProblemKind as K

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"

EXPECTED = {
    "d-config-json": {K.CONFIG_NOT_JSON, K.SIZE_MISMATCH},
    "d-r-not-int": {K.CONFIG_INVALID, K.SIZE_MISMATCH},
    "d-truncated": {K.WEIGHTS_TRUNCATED, K.SIZE_MISMATCH},
    "d-other-shape": {K.WEIGHTS_SHAPE, K.SIZE_MISMATCH},
    "d-removed": {K.MISSING_FILE},
    "d-planted": {K.SYMLINK_PLANTED},
    "d-link-outside": {K.SYMLINK_ESCAPES},
    "d-version-gone": {K.DANGLING_LINK},
    "team/d-nan": {K.HASH_MISMATCH, K.WEIGHTS_NON_FINITE},
    "d-flipped": {K.HASH_MISMATCH},
    "d-extra": {K.UNEXPECTED_FILE},
}
"""Damaged entry -> the kinds of problem ``check`` reports for it (every one)."""
SAME_SIZE = {"team/d-nan", "d-flipped"}
"""Damage only a hash finds (the cheap checks of ``scan`` cannot)."""
OLD = "old-no-manifest"
"""An entry added before manifests: a warning, not damage."""


def damage_all(store: AdapterStore, source: Path, other_rank: Path, outside: Path) -> None:
    """Add every entry of ``EXPECTED`` (and ``OLD``) from ``source``, then damage each."""
    for name in [*EXPECTED, OLD]:
        store.add(name, source)
    v = {name: store.path_of(name) for name in [*EXPECTED, OLD]}
    (v["d-config-json"] / CONFIG).write_text("{not json")
    raw = json.loads((v["d-r-not-int"] / CONFIG).read_text())
    (v["d-r-not-int"] / CONFIG).write_text(json.dumps({**raw, "r": "eight"}))
    w = v["d-truncated"] / WEIGHTS
    os.truncate(w, w.stat().st_size // 2)
    shutil.copyfile(other_rank / WEIGHTS, v["d-other-shape"] / WEIGHTS)
    (v["d-removed"] / WEIGHTS).unlink()
    (v["d-planted"] / WEIGHTS).unlink()
    os.symlink("/etc/passwd", v["d-planted"] / WEIGHTS)
    shutil.copytree(source, outside / "copy")
    link = store.root / "d-link-outside" / "@"
    link.unlink()
    os.symlink(outside / "copy", link)
    shutil.rmtree(v["d-version-gone"])
    _poke(v["team/d-nan"] / WEIGHTS, lambda _: struct.pack("<f", float("nan")))
    _poke(v["d-flipped"] / WEIGHTS, lambda b: bytes([b[0] ^ 0x01]) + b[1:])
    (v["d-extra"] / "notes.txt").write_text("left here by hand\n")
    (v[OLD] / MANIFEST_NAME).unlink()


def _poke(path: Path, change) -> None:
    """Rewrite, in place, the first 4 data bytes of the first tensor with data (same size)."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    start = min(i["data_offsets"][0] for k, i in header.items()
                if k != "__metadata__" and i["data_offsets"][1] > i["data_offsets"][0])
    at = 8 + n + start
    data[at:at + 4] = change(bytes(data[at:at + 4]))
    path.write_bytes(bytes(data))
