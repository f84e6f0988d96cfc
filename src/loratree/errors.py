"""Typed errors. Each names what is wrong so a caller can act on it.

Bad user input is a ``ValueError`` (or ``TypeError``); broken state is a ``RuntimeError``.
The adapter-file errors below subclass ``AdapterFileError`` so a server can catch one type.
"""

from __future__ import annotations

__all__ = [
    "AdapterConfigError",
    "AdapterFileError",
    "AdapterInUseError",
    "AdapterNameError",
    "AdapterNotFoundError",
    "CacheFullError",
    "CopyTooLargeError",
    "CorruptFileError",
    "DamagedAdapterError",
    "EmptyRowError",
    "MergeError",
    "MissingKeyError",
    "NonFiniteError",
    "QuantizedBaseError",
    "RankTooLargeError",
    "ResponseFormatError",
    "ShapeMismatchError",
    "TargetError",
    "TreeError",
    "UnexpectedKeyError",
    "UnsafeFormatError",
    "UnsupportedModelError",
]


class AdapterFileError(ValueError):
    """An adapter directory or file cannot be used."""


class UnsafeFormatError(AdapterFileError):
    """The file is in a format that would need unpickling (e.g. ``adapter_model.bin``)."""


class CorruptFileError(AdapterFileError):
    """The file is truncated or its header is not valid safetensors."""


class DamagedAdapterError(AdapterFileError):
    """A store entry's files changed or broke after it was added (damage at rest): a file
    missing, truncated, replaced or not matching the hash recorded at add, or a link that
    leads nowhere or out of the store. The message names the entry, every problem and the
    command that fixes it; the other entries of the store are unaffected."""


class AdapterConfigError(AdapterFileError):
    """``adapter_config.json`` is missing, not JSON, or holds invalid values."""


class MissingKeyError(AdapterFileError):
    """The file lacks tensors the model's adapted layers need."""


class UnexpectedKeyError(AdapterFileError):
    """The file holds tensors no adapted layer can take."""


class ShapeMismatchError(AdapterFileError):
    """A tensor's shape does not fit its layer (wrong rank or wrong features)."""


class NonFiniteError(ValueError):
    """A tensor holds NaN or Inf where finite values are required."""


class TargetError(ValueError):
    """A target pattern matched nothing, or matched a module that cannot be adapted."""


class MergeError(ValueError):
    """A slot cannot be folded into the base: e.g. a LoRA bias on a layer with no bias."""


class CopyTooLargeError(ValueError):
    """An adapter's full module copies (``modules_to_save``) exceed the slot table's byte
    budget for them."""


class QuantizedBaseError(ValueError):
    """An operation would write into a quantized (NF4) base weight in place.

    Merging into 4-bit weights re-quantizes them, so every merge or switch would add
    rounding error. Export instead: ``loratree.surgery.export_merged``.
    """


class AdapterNameError(ValueError):
    """An adapter name is not allowed: it could lead outside the store, or is malformed."""


class AdapterNotFoundError(KeyError):
    """No adapter of that name is in the store (or the cache, or the model's slots)."""

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return str(self.args[0]) if self.args else "adapter not found"


class CacheFullError(RuntimeError):
    """The cache cannot hold what was asked: pinned and in-use adapters fill its budget."""


class AdapterInUseError(RuntimeError):
    """The adapter serves a running request, so it cannot be evicted or replaced now."""


class RankTooLargeError(ValueError):
    """The adapter's rank exceeds the slot table's configured maximum."""


class TreeError(ValueError):
    """An adapter tree is inconsistent: a node's parent is missing or is not a LoRA adapter,
    it was trained on another base model, or its record is malformed or too deep."""


class UnsupportedModelError(ValueError):
    """The model has a kind of attention (or layer) loratree cannot run exactly; it is
    refused up front rather than served wrong."""


class EmptyRowError(ValueError):
    """A training row encodes to nothing a model can learn; the message names the row."""


class ResponseFormatError(ValueError):
    """A structured-output format cannot be enforced: its schema is not a JSON schema, or
    uses a feature the grammar engine refuses (the message names which)."""
