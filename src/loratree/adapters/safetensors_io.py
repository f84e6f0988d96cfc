"""Reading safetensors files defensively: validate the header before trusting it."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import load, load_file

from loratree.errors import CorruptFileError, NonFiniteError

__all__ = ["parse_safetensors", "read_header", "read_safetensors"]

_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors(path: str | Path, *, require_finite: bool = True) -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file after checking its header against its size.

    Raises ``CorruptFileError`` for a short file, a header length past the end of the file,
    a header that is not JSON, or tensor data outside the file; ``NonFiniteError`` naming
    the first tensor holding NaN or Inf.
    """
    path = Path(path)
    try:
        return _read(path, require_finite)
    except OSError as e:  # missing, a directory, a fifo, no permission
        raise CorruptFileError(f"{path.name}: cannot read: {e.strerror or type(e).__name__}"
                               ) from e


def read_header(path: str | Path) -> dict[str, dict]:
    """The header of a safetensors file (key -> dtype, shape, data_offsets), checked against
    the file's size without reading its data: what a cheap check of a stored file needs.

    Raises ``CorruptFileError`` as ``read_safetensors`` does for the header's problems.
    """
    path = Path(path)
    try:
        return _header(path)
    except OSError as e:
        raise CorruptFileError(f"{path.name}: cannot read: {e.strerror or type(e).__name__}"
                               ) from e


def _header(path: Path) -> dict[str, dict]:
    if not path.is_file():
        raise CorruptFileError(f"{path.name}: not a regular file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise CorruptFileError(f"{path.name}: {size} bytes is too short for safetensors")
        (header_len,) = struct.unpack("<Q", raw_len)
        return _check_header(path.name, header_len, size, f.read(min(header_len, _MAX_HEADER)))


def _read(path: Path, require_finite: bool) -> dict[str, torch.Tensor]:
    _header(path)
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError
        raise CorruptFileError(f"{path.name}: cannot read safetensors: {e}") from e
    return _finite(path.name, tensors) if require_finite else tensors


def parse_safetensors(data: bytes, name: str, *, require_finite: bool = True
                      ) -> dict[str, torch.Tensor]:
    """``read_safetensors`` for a file's bytes already in memory (``name`` labels errors).
    The tensors are copies, independent of any file: what a reader of a file that may be
    rewritten in place needs (``load_file`` maps the file, so its tensors change with it)."""
    if len(data) < 8:
        raise CorruptFileError(f"{name}: {len(data)} bytes is too short for safetensors")
    (header_len,) = struct.unpack("<Q", data[:8])
    _check_header(name, header_len, len(data), data[8:8 + min(header_len, _MAX_HEADER)])
    try:
        tensors = {k: t.clone() for k, t in load(data).items()}
    except Exception as e:  # safetensors raises its own SafetensorError
        raise CorruptFileError(f"{name}: cannot read safetensors: {e}") from e
    return _finite(name, tensors) if require_finite else tensors


def _check_header(name: str, header_len: int, size: int, header_bytes: bytes
                  ) -> dict[str, dict]:
    if header_len > size - 8 or header_len > _MAX_HEADER:
        raise CorruptFileError(
            f"{name}: header length {header_len} is larger than the file ({size} bytes)")
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{name}: the safetensors header is not JSON") from e
    if not isinstance(header, dict):
        raise CorruptFileError(f"{name}: the safetensors header is not a JSON object")
    _check_offsets(name, header, size - 8 - header_len)
    return header


def _finite(name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NonFiniteError(f"{name}: tensor {key!r} holds NaN or Inf")
    return tensors


def _check_offsets(name: str, header: dict, data_len: int) -> None:
    """Every tensor's bytes lie in the data, and the tensors tile it exactly: no overlap,
    no gap, nothing after the last one (as the safetensors format requires)."""
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            raise CorruptFileError(f"{name}: tensor {key!r} has no valid data_offsets")
        if offsets[1] > data_len:
            raise CorruptFileError(
                f"{name}: tensor {key!r} ends at byte {offsets[1]}, past the data "
                f"({data_len} bytes); the file is truncated"
            )
        spans.append((offsets[0], offsets[1], key))
    end = 0
    for start, stop, key in sorted(spans):
        if start < end:
            raise CorruptFileError(f"{name}: tensor {key!r} overlaps the tensor before it")
        if start > end:
            raise CorruptFileError(f"{name}: {start - end} bytes before tensor {key!r} belong "
                                   "to no tensor")
        end = stop
    if end != data_len:
        raise CorruptFileError(f"{name}: {data_len - end} bytes after the last tensor belong "
                               "to no tensor")
