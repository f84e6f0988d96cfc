"""PEFT's on-disk names and config fields, mapped to ours in one place.

On disk a LoRA adapter is ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (``lora_embedding_A`` /
``lora_embedding_B`` for embeddings). In code we say ``lora_a`` / ``lora_b`` per slot.
A DoRA adapter (``use_dora: true``) also holds ``<module>.lora_magnitude_vector`` (no
``.weight`` suffix), one value per output feature.
With ``lora_bias`` B's bias is ``...lora_B.bias``; a ``modules_to_save`` copy is saved
under the module's own name: ``base_model.model.<module>.weight`` (and ``.bias``).
Trainable token rows (``trainable_token_indices``) are
``<module>.token_adapter.trainable_tokens_delta`` ``(n, dim)``: the rows themselves (not a
difference), their ids in the config; a head tied to the embedding saves nothing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from safetensors.torch import save_file
from torch import Tensor

from loratree.config import LoraConfig, token_problems
from loratree.errors import AdapterConfigError, UnsafeFormatError
from loratree.fsio import atomic_write

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "config_from_peft",
    "config_to_peft",
    "copy_key",
    "magnitude_key",
    "matches_saved",
    "param_factors_from_peft",
    "param_factors_to_peft",
    "parse_config",
    "parse_copy_key",
    "parse_key",
    "parse_token_key",
    "peft_key",
    "read_config",
    "token_key",
    "wrapper_path",
    "write_adapter_dir",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\."
    r"(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?!(?:weight|bias)$)(?P<adapter>[^.]+))?(?:\.(?P<param>weight|bias))?$"
)
_COPY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)(?:\.modules_to_save\.[^.]+)?"
    r"\.(?P<param>weight|bias)$"
)
_TOKENS = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.token_adapter\.trainable_tokens_delta$")
Part = Literal["a", "b", "bias", "m"]
_UNSUPPORTED = {
    "layer_replication": "layer replication",
}


def peft_key(module: str, part: Part, embedding: bool) -> str:
    """Our (module, lora_a | lora_b | lora_bias) -> PEFT's tensor key."""
    if part == "bias":
        return f"{_PREFIX}{module}.lora_B.bias"
    letter = part.upper()
    if embedding:
        return f"{_PREFIX}{module}.lora_embedding_{letter}"
    return f"{_PREFIX}{module}.lora_{letter}.weight"


def wrapper_path(owner: str, depth: int) -> str:
    """Where PEFT keeps the factors of a targeted parameter: its owner module, under one
    ``.base_layer`` per parameter of that module targeted after it (PEFT nests one wrapper
    per parameter, in the module's registration order, the first innermost)."""
    return owner + ".base_layer" * depth


def param_factors_from_peft(a: Tensor, b: Tensor, experts: int) -> tuple[Tensor, Tensor]:
    """PEFT's factors of a targeted parameter -> ours.

    PEFT stores A ``(r * E, in)``, expert e's rows at ``e * r .. e * r + r - 1``, and B
    ``(out, r * E)``, expert e's column j at ``j * E + e``. Ours: A ``(r, E, in)``,
    B ``(out, r, E)`` (``ops.experts``).
    """
    rows = a.shape[0] // experts
    return (a.reshape(experts, rows, a.shape[1]).transpose(0, 1).contiguous(),
            b.reshape(b.shape[0], rows, experts))


def param_factors_to_peft(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Ours -> PEFT's (the inverse of ``param_factors_from_peft``)."""
    r, experts, fan_in = a.shape
    return (a.transpose(0, 1).reshape(experts * r, fan_in).contiguous(),
            b.reshape(b.shape[0], r * experts).contiguous())


def magnitude_key(module: str) -> str:
    """PEFT's key of a DoRA magnitude."""
    return f"{_PREFIX}{module}.lora_magnitude_vector"


def parse_key(key: str) -> tuple[str, Part] | None:
    """PEFT's tensor key -> (module name, "a" | "b" | "bias" | "m" (a DoRA magnitude)), or
    None if it is not a LoRA tensor. Only B has a bias (``lora_bias``); ``lora_A.bias`` is
    not a LoRA tensor."""
    m = _KEY.match(key)
    if m is None:
        return None
    if m["kind"] == "lora_magnitude_vector":
        return (m["module"], "m") if m["param"] != "bias" else None
    if m["param"] == "bias":
        return (m["module"], "bias") if m["kind"] == "lora_B" else None
    return m["module"], "a" if m["kind"].endswith("A") else "b"


def copy_key(module: str, param: str) -> str:
    """The key of a ``modules_to_save`` copy's ``weight`` / ``bias``, as PEFT saves it."""
    return f"{_PREFIX}{module}.{param}"


def parse_copy_key(key: str) -> tuple[str, str] | None:
    """A ``modules_to_save`` copy's key -> (module name, "weight" | "bias"), or None."""
    m = _COPY.match(key)
    return None if m is None else (m["module"], m["param"])


def token_key(module: str) -> str:
    """The key of a module's trainable token rows, as PEFT saves them."""
    return f"{_PREFIX}{module}.token_adapter.trainable_tokens_delta"


def parse_token_key(key: str) -> str | None:
    """A trainable-token-rows key -> its module name, or None."""
    m = _TOKENS.match(key)
    return None if m is None else m["module"]


def matches_saved(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether module ``name`` is one of ``modules_to_save`` (PEFT: the name or a suffix
    after a dot)."""
    return any(name == p or name.endswith("." + p) for p in patterns)


MAX_CONFIG_BYTES = 1 << 20
"""An adapter_config.json is a few hundred bytes; a larger one is refused unread."""


def read_config(path: Path) -> dict[str, Any]:
    """The raw ``adapter_config.json`` of an adapter directory, checked to be safe to use."""
    if not path.is_dir():
        raise AdapterConfigError(f"{path}: not an adapter directory")
    if not (path / WEIGHTS_NAME).exists() and (path / "adapter_model.bin").exists():
        raise UnsafeFormatError(
            f"{path.name}: only adapter_model.bin (a pickle) is present; loratree never "
            "unpickles. Convert it to adapter_model.safetensors with a tool you trust."
        )
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if (path / name).is_symlink():
            raise UnsafeFormatError(f"{path.name}: {name} is a symlink; adapter files must be "
                                    "regular files")
    cfg_path = path / CONFIG_NAME
    if cfg_path.is_file() and cfg_path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterConfigError(f"{path.name}: {CONFIG_NAME} is over {MAX_CONFIG_BYTES} bytes")
    try:
        data = cfg_path.read_bytes()
    except FileNotFoundError as e:
        raise AdapterConfigError(f"{path.name}: {CONFIG_NAME} is missing") from e
    except OSError as e:  # a directory, a fifo, no permission
        raise AdapterConfigError(f"{path.name}: cannot read {CONFIG_NAME}: "
                                 f"{e.strerror or type(e).__name__}") from e
    return parse_config(data, path.name)


def parse_config(data: bytes, label: str) -> dict[str, Any]:
    """An ``adapter_config.json``'s bytes as the JSON object it must hold (``label``, the
    adapter directory's name, labels errors)."""
    if len(data) > MAX_CONFIG_BYTES:
        raise AdapterConfigError(f"{label}: {CONFIG_NAME} is over {MAX_CONFIG_BYTES} bytes")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterConfigError(f"{label}: {CONFIG_NAME} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise AdapterConfigError(f"{label}: {CONFIG_NAME} must hold a JSON object")
    return raw


def write_adapter_dir(path: str | Path, tensors: dict[str, Tensor],
                      raw: dict[str, Any]) -> Path:
    """Write ``tensors`` and the PEFT config ``raw`` into the adapter directory ``path``
    (created if missing); returns the path.

    Each file is replaced atomically on its own, not the directory as a whole: the
    directory may also hold files written beside the adapter (``routing.json``,
    ``tree.json``, a trainer's metrics), which a directory swap would drop. The weights go
    first, so a config is never newer than the weights it describes.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), {"format": "pt"}))
    text = json.dumps(raw, indent=2, sort_keys=True) + "\n"
    atomic_write(path / CONFIG_NAME, lambda p: p.write_text(text, encoding="utf-8"))
    return path


def config_from_peft(raw: dict[str, Any]) -> LoraConfig:
    """PEFT's LoRA config fields -> ``LoraConfig``; unsupported features are refused."""
    if raw.get("peft_type") != "LORA":
        raise AdapterConfigError(f"peft_type must be 'LORA', got {raw.get('peft_type')!r}")
    for field, what in _UNSUPPORTED.items():
        if raw.get(field):
            raise AdapterConfigError(f"{field}: {what} is not supported")
    saved = raw.get("modules_to_save") or ()
    if isinstance(saved, str) or not all(isinstance(m, str) and m for m in saved):
        raise AdapterConfigError(f"modules_to_save must be a list of names, got {saved!r}")
    if raw.get("bias", "none") != "none":
        raise AdapterConfigError(f"bias: only 'none' is supported, got {raw.get('bias')!r}")
    params = raw.get("target_parameters") or []
    if not isinstance(params, list) or not all(isinstance(t, str) and t for t in params):
        raise AdapterConfigError(f"target_parameters must be a list of names, got {params!r}")
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        targets = ("all-linear",) if targets == "all-linear" else (f"re:{targets}",)
    elif isinstance(targets, list) and (targets or params) and all(
            isinstance(t, str) for t in targets):
        targets = tuple(targets)
    elif targets is None and params:
        targets = ()
    else:
        raise AdapterConfigError(f"target_modules must be a string or a list, got {targets!r}")
    tokens = _token_indices(raw)
    exclude = raw.get("exclude_modules") or ()
    exclude = (f"re:{exclude}",) if isinstance(exclude, str) else tuple(exclude)
    try:
        return LoraConfig(
            rank=raw.get("r"),
            alpha=raw.get("lora_alpha", raw.get("r")),
            dropout=raw.get("lora_dropout", 0.0),
            targets=targets,
            exclude=exclude,
            use_rslora=bool(raw.get("use_rslora", False)),
            use_dora=bool(raw.get("use_dora", False)),
            rank_pattern=dict(raw.get("rank_pattern") or {}),
            alpha_pattern=dict(raw.get("alpha_pattern") or {}),
            lora_bias=bool(raw.get("lora_bias", False)),
            modules_to_save=tuple(saved),
            target_parameters=tuple(params),
            trainable_token_indices=tokens,
        )
    except (ValueError, TypeError) as e:
        raise AdapterConfigError(f"invalid LoRA settings: {e}") from e


def _token_indices(raw: dict[str, Any]) -> tuple[int, ...] | dict[str, tuple[int, ...]]:
    """PEFT's ``trainable_token_indices`` (a list, or a dict of lists), checked: distinct
    ids >= 0; the error names the field (and the dict's key)."""
    tokens = raw.get("trainable_token_indices") or ()
    if isinstance(tokens, dict):
        tokens = {k: tuple(v) if isinstance(v, list) else v for k, v in tokens.items()}
    elif isinstance(tokens, list):
        tokens = tuple(tokens)
    problems = token_problems(tokens) if tokens else []
    if problems:
        raise AdapterConfigError("; ".join(problems))
    return tokens


def config_to_peft(
    config: LoraConfig,
    target_modules: list[str] | str,
    *,
    base_model: str | None,
    task_type: str | None,
    fan_in_fan_out: bool,
) -> dict[str, Any]:
    """``LoraConfig`` -> the fields PEFT reads, and only those (``use_dora`` only when set,
    so a plain adapter's file is as before)."""
    raw = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": target_modules,
        "target_parameters": list(config.target_parameters) or None,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "use_rslora": config.use_rslora,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "lora_bias": config.lora_bias,
        "modules_to_save": list(config.modules_to_save) or None,
    }
    if config.use_dora:
        raw["use_dora"] = True
    tokens = config.trainable_token_indices
    if tokens:
        raw["trainable_token_indices"] = ({k: list(v) for k, v in tokens.items()}
                                          if isinstance(tokens, dict) else list(tokens))
    return raw
