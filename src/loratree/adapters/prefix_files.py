"""Prefix adapters on disk, in PEFT's prefix-tuning format.

``adapter_config.json`` carries PEFT's fields (``peft_type: "PREFIX_TUNING"``,
``num_virtual_tokens``, ``token_dim`` = kv heads x head dim, ``num_attention_heads`` = kv
heads, ``num_layers``, ``num_transformer_submodules: 1``, ``encoder_hidden_size``,
``prefix_projection``); ``adapter_model.safetensors`` holds one tensor,
``prompt_embeddings`` (P, num_layers * 2 * token_dim): the prefix vectors, folded through
the MLP when one was trained. PEFT loads such a file for inference whatever
``prefix_projection`` says, and so do we. An adapter trained with ``positions="keep"``
also records ``"loratree_positions": "keep"`` (PEFT ignores the key).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from loratree.adapters.peft_format import WEIGHTS_NAME, write_adapter_dir
from loratree.adapters.safetensors_io import read_safetensors
from loratree.config import PrefixConfig
from loratree.errors import (
    AdapterConfigError,
    AdapterFileError,
    MissingKeyError,
    ShapeMismatchError,
    UnexpectedKeyError,
)
from loratree.surgery import add_prefix, geometry, prefix_bank

__all__ = ["PrefixFile", "check_prefix_config", "load_prefix", "read_prefix", "save_prefix"]

PEFT_TYPE = "PREFIX_TUNING"
KEY = "prompt_embeddings"
_INT_FIELDS = ("num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers")


@dataclass(frozen=True)
class PrefixFile:
    """A prefix adapter as read from disk."""

    vectors: Tensor
    n_layers: int
    n_heads: int
    token_dim: int
    positions: str
    raw_config: dict[str, Any]

    @property
    def n_virtual(self) -> int:
        return self.vectors.shape[0]


def save_prefix(model: nn.Module, path: str | Path, slot: int = 0, *,
                base_model: str | None = None) -> Path:
    """Write the prefix adapter in ``slot`` as a PEFT prefix-tuning directory."""
    bank = prefix_bank(model)
    encoder = bank.encoder(slot) if bank is not None else None
    if encoder is None:
        raise ValueError(f"slot {slot} holds no prefix adapter")
    geo = encoder.geometry
    if base_model is None:
        base_model = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    raw: dict[str, Any] = {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": encoder.n_virtual,
        "token_dim": geo.token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": geo.n_heads,
        "num_layers": geo.n_layers,
        "encoder_hidden_size": encoder.mlp[0].out_features if encoder.projection
        else geo.token_dim,
        "prefix_projection": encoder.projection,
    }
    if bank.modes.get(slot) == "keep":
        raw["loratree_positions"] = "keep"
    tensors = {KEY: encoder.fold().float().contiguous().cpu()}
    return write_adapter_dir(path, tensors, raw)


def check_prefix_config(label: str, raw: dict[str, Any]) -> str:
    """Check a prefix adapter's config ``raw`` (no file is read); its positions mode.

    Raises:
        AdapterConfigError: naming the field that is missing or wrong.
    """
    if raw.get("peft_type") != PEFT_TYPE:
        raise AdapterConfigError(f"{label}: peft_type must be {PEFT_TYPE!r}")
    for field in _INT_FIELDS:
        value = raw.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise AdapterConfigError(f"{label}: {field} must be a positive int, got {value!r}")
    if raw.get("num_transformer_submodules", 1) != 1:
        raise AdapterConfigError(f"{label}: num_transformer_submodules must be 1 (a "
                                 "decoder-only model)")
    if raw["token_dim"] % raw["num_attention_heads"]:
        raise AdapterConfigError(f"{label}: token_dim {raw['token_dim']} is not a multiple "
                                 f"of num_attention_heads {raw['num_attention_heads']}")
    positions = raw.get("loratree_positions", "shift")
    if positions not in ("shift", "keep"):
        raise AdapterConfigError(f"{label}: loratree_positions must be 'shift' or 'keep'")
    return positions


def read_prefix(path: str | Path, raw: dict[str, Any],
                tensors: dict[str, Tensor] | None = None) -> PrefixFile:
    """Check a prefix adapter directory whose config ``raw`` is already read (and its
    weights, when ``tensors`` is given)."""
    path = Path(path)
    positions = check_prefix_config(path.name, raw)
    if tensors is None:
        if not (path / WEIGHTS_NAME).exists():
            raise AdapterFileError(f"{path.name}: {WEIGHTS_NAME} is missing")
        tensors = read_safetensors(path / WEIGHTS_NAME)
    extra = sorted(set(tensors) - {KEY})
    if extra:
        raise UnexpectedKeyError(f"{path.name}: {extra[0]!r} is not a prefix tensor")
    if KEY not in tensors:
        raise MissingKeyError(f"{path.name}: {KEY!r} is missing")
    e = tensors[KEY]
    expected = (raw["num_virtual_tokens"], raw["num_layers"] * 2 * raw["token_dim"])
    if tuple(e.shape) != expected:
        raise ShapeMismatchError(f"{path.name}: {KEY!r} is {tuple(e.shape)}, the config says "
                                 f"{expected}")
    return PrefixFile(e, raw["num_layers"], raw["num_attention_heads"], raw["token_dim"],
                      positions, raw)


def load_prefix(model: nn.Module, path: str | Path, raw: dict[str, Any], *,
                trainable: bool = False) -> int:
    """Load a prefix adapter into a new slot; checked against the model before it is touched."""
    adapter = read_prefix(path, raw)
    geo = geometry(model)
    got = (adapter.n_layers, adapter.n_heads, adapter.token_dim)
    want = (geo.n_layers, geo.n_heads, geo.token_dim)
    if got != want:
        raise ShapeMismatchError(
            f"{Path(path).name}: prefix for (layers, kv heads, token_dim) {got}, the model "
            f"has {want}")
    config = PrefixConfig(n_virtual=adapter.n_virtual, positions=adapter.positions)
    return add_prefix(model, config, vectors=adapter.vectors, trainable=trainable)
