"""A base model with NF4 layers, saved and loaded without quantizing again.

Layout (a directory, written atomically):

- ``config.json`` (+ ``generation_config.json``, tokenizer files): as transformers writes.
- ``model.safetensors``: the state dict. An NF4 layer ``<name>`` stores
  ``<name>.weight_nf4`` (uint8, two codes per byte), ``<name>.weight_absmax`` (fp32 per
  block; uint8 when double-quantized, then also ``weight_absmax2`` fp32 and
  ``weight_offset`` fp32), and ``<name>.bias`` if it has one. A tensor shared by two keys
  (tied embeddings) is stored once.
- ``quantization.json``: ``{"format": "loratree-nf4", "version": 1, "dtype": ...,
  "modules": {name: {"block": 64, "double": true}}, "tied": {dropped_key: kept_key}}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from loratree.fsio import atomic_dir
from loratree.layers import LoraModule, NF4Linear

__all__ = [
    "QUANT_NAME",
    "has_nf4",
    "is_quantized_dir",
    "load_quantized",
    "nf4_layers",
    "save_quantized",
]

QUANT_NAME = "quantization.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT, VERSION = "loratree-nf4", 1


def has_nf4(model: nn.Module) -> bool:
    return bool(nf4_layers(model))


def nf4_layers(model: nn.Module) -> dict[str, NF4Linear]:
    """Every NF4Linear of the model by dotted name (inside LoRA wrappers too)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}


def is_quantized_dir(path: str | Path) -> bool:
    return (Path(path) / QUANT_NAME).is_file()


def save_quantized(model: PreTrainedModel, tokenizer: object | None, out: str | Path) -> Path:
    """Save a model whose linear layers are NF4 (see the module docstring for the layout)."""
    if any(isinstance(m, LoraModule) for m in model.modules()):
        raise ValueError("save the quantized base without adapters: unload them first, and "
                         "save adapters with save_adapter")
    layers = nf4_layers(model)
    state, tied = _dedup(model.state_dict())
    spec = {
        "format": FORMAT, "version": VERSION,
        "dtype": str(next(iter(layers.values())).dtype).removeprefix("torch."),
        "modules": {n: {"block": m.block, "double": m.double} for n, m in layers.items()},
        "tied": tied,
    }

    out = Path(out).resolve()
    with atomic_dir(out) as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / QUANT_NAME).write_text(json.dumps(spec, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


def _dedup(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep each shared tensor once; map dropped keys to the key that holds it."""
    kept: dict[str, torch.Tensor] = {}
    by_ptr: dict[tuple[int, int, tuple[int, ...]], str] = {}
    tied: dict[str, str] = {}
    for key, t in state.items():
        ident = (t.data_ptr(), t.numel(), tuple(t.shape))
        if t.numel() and ident in by_ptr:
            tied[key] = by_ptr[ident]
            continue
        by_ptr[ident] = key
        kept[key] = t.detach().contiguous()
    return kept, tied


def load_quantized(path: str | Path, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Load a directory written by :func:`save_quantized`; NF4 codes are used as stored.

    Raises:
        ValueError: ``quantization.json`` or the weights are malformed or do not fit.
    """
    path = Path(path)
    spec = _read_spec(path / QUANT_NAME)
    dtype = dtype or getattr(torch, spec["dtype"])
    kwargs = {"local_files_only": True, "trust_remote_code": False}
    config = AutoConfig.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    for name, m in spec["modules"].items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path / QUANT_NAME}: module {name!r} is not in the model") from None
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{path / QUANT_NAME}: {name!r} is a {type(linear).__name__}, "
                             "not a linear layer")
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, NF4Linear(
            linear.in_features, linear.out_features, linear.bias is not None,
            block=m["block"], double=m["double"], dtype=dtype))
    try:
        state = load_file(path / WEIGHTS_NAME)
    except (OSError, SafetensorError) as e:
        raise ValueError(f"cannot read {path / WEIGHTS_NAME}: {e}") from e
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{path / WEIGHTS_NAME} does not fit the model: {e}") from e
    missing = sorted(set(missing) - set(spec["tied"]))
    if missing or unexpected:
        raise ValueError(f"{path / WEIGHTS_NAME}: missing keys {missing[:5]}, "
                         f"unexpected keys {sorted(unexpected)[:5]}")
    for dropped, src in spec["tied"].items():
        _tie(model, dropped, src)
    return model.eval()


def _tie(model: nn.Module, dropped: str, src: str) -> None:
    """Make parameter ``dropped`` the same tensor as ``src`` (as it was when saved)."""
    owner, _, attr = dropped.rpartition(".")
    src_owner, _, src_attr = src.rpartition(".")
    setattr(model.get_submodule(owner), attr,
            getattr(model.get_submodule(src_owner), src_attr))


def _read_spec(path: Path) -> dict[str, Any]:
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise ValueError(f"{path}: format must be {FORMAT!r}")
    if spec.get("version") != VERSION:
        raise ValueError(f"{path}: version {spec.get('version')!r} is not supported "
                         f"(this loratree reads version {VERSION})")
    if spec.get("dtype") not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{path}: dtype must be float32, bfloat16 or float16")
    modules, tied = spec.get("modules"), spec.get("tied", {})
    if not isinstance(modules, dict) or not all(
        isinstance(m, dict) and m.get("block") in (32, 64, 128, 256, 512, 1024, 2048, 4096)
        and isinstance(m.get("double"), bool) for m in modules.values()
    ):
        raise ValueError(f"{path}: 'modules' must map names to {{block, double}}")
    if not isinstance(tied, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tied.items()
    ):
        raise ValueError(f"{path}: 'tied' must map keys to keys")
    spec["tied"] = tied
    return spec
