"""Save and load LoRA adapters in PEFT's format, strictly and atomically.

Reading never unpickles: safetensors only, the header checked against the file size.
Loading validates everything before it touches the model, so a bad file leaves the model
as it was: every missing or unexpected key, wrong shape or rank, and non-finite value
raises a typed error (``loratree.errors``) that names the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from loratree.adapters.extra_files import (
    check_biases,
    check_copies,
    check_copy_shapes,
    check_magnitude,
)
from loratree.adapters.param_files import (
    check_param_pair,
    param_paths,
    param_tensors,
    target_parameter_names,
)
from loratree.adapters.peft_format import (
    WEIGHTS_NAME,
    config_from_peft,
    config_to_peft,
    copy_key,
    magnitude_key,
    matches_saved,
    parse_copy_key,
    parse_key,
    parse_token_key,
    peft_key,
    read_config,
    write_adapter_dir,
)
from loratree.adapters.prefix_files import PEFT_TYPE, load_prefix, read_prefix, save_prefix
from loratree.adapters.safetensors_io import read_safetensors
from loratree.adapters.summary import summarize, target_modules
from loratree.adapters.token_files import (
    check_tokens_against,
    read_tokens,
    token_bytes,
    token_tensors,
)
from loratree.config import LoraConfig
from loratree.errors import (
    AdapterFileError,
    CorruptFileError,
    MissingKeyError,
    ShapeMismatchError,
    TargetError,
    UnexpectedKeyError,
)
from loratree.layers import LoraEmbedding, LoraParam, SlotContext
from loratree.surgery import (
    adaptable_modules,
    adapter_parameters,
    copy_layers,
    find_targets,
    inject,
    lora_layers,
    prefix_bank,
    saved_modules,
    token_layers,
)
from loratree.surgery.inject import wrap
from loratree.surgery.params import all_linear_config, find_parameters
from loratree.surgery.targets import matches, pattern_value

__all__ = [
    "AdapterFile",
    "bind",
    "check_adapter_dir",
    "check_against",
    "load_adapter",
    "load_adapter_file",
    "read_adapter",
    "save_adapter",
    "write_adapter_file",
]


@dataclass(frozen=True)
class AdapterFile:
    """An adapter as read from disk: its config and, per module, (A, B)."""

    config: LoraConfig
    weights: dict[str, tuple[Tensor, Tensor]]
    base_weights: dict[str, Tensor]
    raw_config: dict
    embeddings: frozenset[str] = frozenset()
    """Modules whose tensors are PEFT's ``lora_embedding_A`` / ``_B`` (embedding layers)."""
    magnitudes: dict[str, Tensor] = field(default_factory=dict)
    """DoRA (``config.use_dora``): per module, the magnitude as PEFT stores it: ``(out,)``,
    a convolution's ``(1, out, 1, ...)``."""
    biases: dict[str, Tensor] = field(default_factory=dict)
    """Per module, B's bias ``(out,)`` (``lora_bias``)."""
    copies: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    """Per module of ``modules_to_save``, its full copy: {"weight": ..., "bias": ...}."""

    tokens: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    """Per module of ``trainable_token_indices``: (token ids ``(n,)``, rows ``(n, dim)``)."""

    @property
    def copy_bytes(self) -> int:
        """What the full copies and token rows cost in memory, as stored."""
        return sum(t.numel() * t.element_size() for c in self.copies.values()
                   for t in c.values()) + token_bytes(self.tokens)
    params: frozenset[str] = frozenset()
    """Entries of ``weights`` that are adapted parameters (``target_parameters``), by full
    parameter name, their factors in our layout (``ops.experts``)."""
    pending: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    """Tensors of a ``target_parameters`` file not yet matched to the model, by PEFT's
    module path, as stored: which parameter a path means depends on the model
    (``bind``)."""

    @property
    def base_model(self) -> str | None:
        return self.raw_config.get("base_model_name_or_path")


def save_adapter(
    model: nn.Module, path: str | Path, slot: int = 0, *, base_model: str | None = None
) -> Path:
    """Write slot ``slot`` of the model as a PEFT adapter directory; returns the path.

    A LoRA slot is written as a PEFT LoRA adapter, a prefix slot as PEFT prefix-tuning.
    """
    bank = prefix_bank(model)
    if bank is not None and bank.encoder(slot) is not None:
        return save_prefix(model, path, slot, base_model=base_model)
    path = Path(path)
    layers = {n: m for n, m in lora_layers(model).items() if m.specs[slot].rank > 0}
    if not layers:
        raise ValueError(f"slot {slot} adapts no layer; nothing to save")
    params = {n: m for n, m in layers.items() if isinstance(m, LoraParam)}
    tensors = param_tensors(model, params, slot)
    for name, layer in layers.items():
        if name in params:
            continue
        emb = isinstance(layer, LoraEmbedding)
        tensors[peft_key(name, "a", emb)] = layer.lora_a[slot].detach().contiguous().cpu()
        tensors[peft_key(name, "b", emb)] = layer.lora_b[slot].detach().contiguous().cpu()
        if str(slot) in layer.lora_magnitude:  # DoRA
            m = layer.lora_magnitude[str(slot)]  # (out,); PEFT's file shape per layer kind
            tensors[magnitude_key(name)] = m.detach().reshape(
                layer.magnitude_shape(m.shape[0])).contiguous().cpu()
        if layer.has_bias(slot):
            tensors[peft_key(name, "bias", emb)] = layer.lora_bias[slot].detach().cpu()
    copies = {n: c for n, c in copy_layers(model).items() if c.has(slot)}
    for name, copy in copies.items():
        weight, bias = copy.weights_of(slot)
        tensors[copy_key(name, "weight")] = weight.detach().contiguous().cpu()
        if bias is not None:
            tensors[copy_key(name, "bias")] = bias.detach().contiguous().cpu()
    token_rows, token_ids = token_tensors(model, slot)
    tensors.update(token_rows)
    specs = {n: m.specs[slot] for n, m in layers.items()}
    config = dataclasses.replace(summarize(specs, frozenset(params), tuple(copies)),
                                 trainable_token_indices=token_ids)
    if base_model is None:
        base_model = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    raw = config_to_peft(
        config,
        target_modules(model, [n for n in layers if n not in params]),
        base_model=base_model,
        task_type="CAUSAL_LM" if hasattr(model, "generate") else None,
        fan_in_fan_out=any(getattr(m, "fan_in_fan_out", False) for m in layers.values()),
    )
    if params:
        raw["target_parameters"] = target_parameter_names(model, list(params))
    return write_adapter_dir(path, tensors, raw)


def read_adapter(path: str | Path, raw: dict | None = None,
                 tensors: dict[str, Tensor] | None = None) -> AdapterFile:
    """Read and check an adapter directory, without a model. ``raw`` and ``tensors``:
    its config and weights already read (``path`` then only labels errors)."""
    path = Path(path)
    raw = read_config(path) if raw is None else raw
    config = config_from_peft(raw)
    if tensors is None:
        if not (path / WEIGHTS_NAME).exists():
            raise AdapterFileError(f"{path.name}: {WEIGHTS_NAME} is missing")
        tensors = read_safetensors(path / WEIGHTS_NAME)
    halves: dict[str, dict[str, Tensor]] = {}
    base_weights: dict[str, Tensor] = {}
    biases: dict[str, Tensor] = {}
    copies: dict[str, dict[str, Tensor]] = {}
    token_rows: dict[str, Tensor] = {}
    embeddings = set()
    for key, t in tensors.items():
        if (module := parse_token_key(key)) is not None:
            token_rows[module] = t
            continue
        if key.endswith(".base_layer.weight"):  # PEFT saves targeted embeddings whole
            base_weights[key.removeprefix("base_model.model.")[: -len(".base_layer.weight")]] = t
            continue
        parsed = parse_key(key)
        if parsed is None:
            copy = parse_copy_key(key)
            if copy is None or not matches_saved(copy[0], config.modules_to_save):
                raise UnexpectedKeyError(f"{path.name}: {key!r} is not a LoRA tensor")
            copies.setdefault(copy[0], {})[copy[1]] = t
            continue
        module, part = parsed
        if part == "bias":
            biases[module] = t
            continue
        halves.setdefault(module, {})[part] = t
        if ".lora_embedding_" in key:
            embeddings.add(module)
    if not halves:
        raise MissingKeyError(f"{path.name}: {WEIGHTS_NAME} holds no LoRA tensors")
    later = {m for m in halves if config.target_parameters and not _named_module(config, m)}
    weights = {module: _pair(path, module, pair, config) for module, pair in halves.items()
               if module not in later}
    pending = {m: _halves(path, m, halves[m]) for m in later}
    magnitudes = {module: check_magnitude(path, module, pair, config)
                  for module, pair in halves.items()
                  if module in weights and (config.use_dora or "m" in pair)}
    check_biases(path.name, config, weights, biases, embeddings)
    check_copies(path.name, copies)
    return AdapterFile(config, weights, base_weights, raw, frozenset(embeddings),
                       magnitudes=magnitudes, biases=biases, copies=copies,
                       pending=pending, tokens=read_tokens(path.name, config, token_rows))


def _named_module(config: LoraConfig, module: str) -> bool:
    """Whether a name-only pattern of ``config.targets`` selects ``module`` (in a
    ``target_parameters`` file, the other keys wait for the model: ``bind``)."""
    return ".base_layer" not in module and any(
        matches(p, module, None, None) for p in config.targets
        if p != "all-linear" and not p.startswith("type:"))


def _halves(path: Path, module: str, pair: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    for part in ("a", "b"):
        if part not in pair:
            have = "B" if part == "a" else "A"
            raise MissingKeyError(
                f"{path.name}: {module!r} has lora_{have} but not lora_{part.upper()} "
                f"({peft_key(module, part, False)!r} is missing)"
            )
    return pair["a"], pair["b"]


def _pair(path: Path, module: str, pair: dict[str, Tensor], config: LoraConfig
          ) -> tuple[Tensor, Tensor]:
    """One module's (A, B) from the file, checked: both present, float, sharing the rank
    the config gives the module."""
    a, b = _halves(path, module, pair)
    if not (a.is_floating_point() and b.is_floating_point()):
        raise CorruptFileError(
            f"{path.name}: {module!r} holds {a.dtype} / {b.dtype} weights; LoRA weights "
            "are floating point")
    if a.dim() < 2 or b.dim() < 2 or a.shape[0] != b.shape[1]:
        raise ShapeMismatchError(
            f"{path.name}: {module!r} lora_A {tuple(a.shape)} and lora_B "
            f"{tuple(b.shape)} do not share a rank"
        )
    expected = int(pattern_value(config.rank_pattern, module, config.rank))
    if a.shape[0] != expected:
        raise ShapeMismatchError(
            f"{path.name}: {module!r} has rank {a.shape[0]}, the config says {expected}"
        )
    return a, b


def write_adapter_file(adapter: AdapterFile, path: str | Path) -> Path:
    """Write an ``AdapterFile`` held in memory (one composed from others, say) as a PEFT
    adapter directory, atomically file by file; returns the path."""
    path = Path(path)
    if adapter.params:
        raise ValueError(f"{path.name}: adapted parameters need the model to name their "
                         "tensors; save them with save_adapter")
    tensors = {}
    for module, (a, b) in (*adapter.weights.items(), *adapter.pending.items()):
        emb = module in adapter.embeddings
        tensors[peft_key(module, "a", emb)] = a.detach().contiguous().cpu()
        tensors[peft_key(module, "b", emb)] = b.detach().contiguous().cpu()
    for module, m in adapter.magnitudes.items():
        tensors[magnitude_key(module)] = m.detach().contiguous().cpu()
    return write_adapter_dir(path, tensors, adapter.raw_config)


def check_adapter_dir(path: str | Path) -> str:
    """Read and check an adapter directory of either kind, without a model; its kind."""
    path = Path(path)
    raw = read_config(path)
    if raw.get("peft_type") == PEFT_TYPE:
        read_prefix(path, raw)
        return "prefix"
    read_adapter(path)
    return "lora"


def load_adapter(model: nn.Module, path: str | Path, *, trainable: bool = False) -> int:
    """Load an adapter directory into a new slot of the model; returns the slot.

    Strict: the file must cover exactly the modules its config targets in this model, with
    the shapes those modules need. Nothing in the model changes unless every check passes.
    """
    path = Path(path)
    raw = read_config(path)
    if raw.get("peft_type") == PEFT_TYPE:
        return load_prefix(model, path, raw, trainable=trainable)
    return load_adapter_file(model, read_adapter(path), path.name, trainable=trainable)


def load_adapter_file(model: nn.Module, adapter: AdapterFile, label: str, *,
                      trainable: bool = False) -> int:
    """Load an ``AdapterFile`` held in memory into a new slot of the model; returns the
    slot. Checked like ``load_adapter``: nothing changes unless every check passes."""
    adapter = check_against(model, adapter, label)
    report = inject(model, adapter.config, trainable=trainable, names=tuple(adapter.weights))
    layers = lora_layers(model)
    for module, (a, b) in adapter.weights.items():
        layers[module].load_slot(report.slot, a, b, adapter.magnitudes.get(module),
                                 adapter.biases.get(module))
    copies = copy_layers(model)
    for module, parts in adapter.copies.items():
        with torch.no_grad():
            for p, t in zip(copies[module].parameters_of(report.slot),
                            (parts["weight"], parts.get("bias")), strict=False):
                p.copy_(t)
    rows = token_layers(model)
    with torch.no_grad():
        for module, (_, t) in adapter.tokens.items():
            rows[module].rows_of(report.slot).copy_(t)
    if not trainable:
        for p in adapter_parameters(model, report.slot):
            p.requires_grad_(False)
    return report.slot


def bind(model: nn.Module, adapter: AdapterFile, label: str) -> AdapterFile:
    """``adapter`` with its pending tensors matched to ``model``: each PEFT path of a
    targeted parameter becomes that parameter's entry (checked, in our layout), any other
    path a module's. Raises the typed error naming the parameter that does not fit."""
    if not adapter.pending:
        return adapter
    config = all_linear_config(model, adapter.config)
    try:
        params = find_parameters(model, config.target_parameters)
    except TargetError as e:
        raise UnexpectedKeyError(f"{label}: {e}") from e
    paths = param_paths(model, params)
    by_path = {p: n for n, p in paths.items()}
    weights = dict(adapter.weights)
    for path, (a, b) in adapter.pending.items():
        name = by_path.get(path)
        if name is None:
            weights[path] = _pair(Path(label), path, {"a": a, "b": b}, adapter.config)
        else:
            weights[name] = check_param_pair(label, name, params[name][0], a, b, config)
    for name, path in paths.items():
        if name not in weights:
            raise MissingKeyError(f"{label}: the config targets parameter {name!r}, but "
                                  f"{peft_key(path, 'a', False)!r} is missing")
    return dataclasses.replace(adapter, weights=weights, pending={},
                               params=frozenset(params))


def check_against(model: nn.Module, adapter: AdapterFile, label: str) -> AdapterFile:
    """Check that ``adapter`` fits ``model``: every module it names exists and can be
    adapted, every module its config targets has its tensors, and every shape is the one
    the model needs. Raises the typed error naming the first mismatch. Returns the adapter
    matched to the model (``bind``), which is what to load."""
    adapter = bind(model, adapter, label)
    candidates = adaptable_modules(model)
    unknown = [m for m in adapter.weights if m not in adapter.params and m not in candidates]
    if unknown:
        raise UnexpectedKeyError(
            f"{label}: {peft_key(unknown[0], 'a', False)!r} names module {unknown[0]!r}, "
            "which the model does not have (or cannot adapt)"
        )
    config = all_linear_config(model, adapter.config)
    try:
        targeted = find_targets(model, config.targets, config.exclude) if config.targets else {}
    except ValueError:
        targeted = {}
    for module, base in targeted.items():
        if module not in adapter.weights:
            emb = isinstance(base, nn.Embedding)
            raise MissingKeyError(
                f"{label}: the config targets {module!r}, but {peft_key(module, 'a', emb)!r} "
                "is missing"
            )
    existing = lora_layers(model)
    for module, (a, b) in adapter.weights.items():
        if module in adapter.params:  # checked by bind, when read
            continue
        layer = existing.get(module) or wrap(candidates[module], SlotContext(), module)
        r = a.shape[0]
        for part, t, want in (("A", a, layer.a_shape(r)), ("B", b, layer.b_shape(r))):
            if tuple(t.shape) != tuple(want):
                raise ShapeMismatchError(
                    f"{label}: {module!r} lora_{part} has shape {tuple(t.shape)}, "
                    f"the model needs {tuple(want)}"
                )
        _checkcheck_magnitude(adapter, module, layer, label)
    _check_extras_against(model, adapter, label, existing, candidates)
    for module, w in adapter.base_weights.items():
        base = candidates.get(module)
        if base is None or tuple(base.weight.shape) != tuple(w.shape) or not torch.equal(
            base.weight.detach().cpu().to(w.dtype), w
        ):
            raise UnexpectedKeyError(
                f"{label}: the file carries a changed base weight for {module!r} "
                f"({module}.base_layer.weight); loratree loads adapters, not base weights"
            )
    return adapter


def _checkcheck_magnitude(adapter: AdapterFile, module: str, layer: object, label: str) -> None:
    """A DoRA magnitude fits ``layer``: DoRA is implemented there and the shape is its."""
    m = adapter.magnitudes.get(module)
    if m is None:
        return
    if not getattr(layer, "dora_ok", False):
        raise TargetError(f"{label}: {magnitude_key(module)!r}: DoRA is supported on linear "
                          f"and convolution layers only, {module!r} is a "
                          f"{type(layer).__name__}")
    want = layer.magnitude_shape(layer.b_shape(1)[0])
    if tuple(m.shape) != want:
        raise ShapeMismatchError(f"{label}: {magnitude_key(module)!r} has shape "
                                 f"{tuple(m.shape)}, the model needs {want}")


def _check_extras_against(model: nn.Module, adapter: AdapterFile, label: str,
                          existing: dict, candidates: dict) -> None:
    """LoRA biases fit linear layers; every ``modules_to_save`` module the model has comes
    with a copy of its shapes, and none is also adapted by LoRA."""
    for module, t in adapter.biases.items():
        layer = existing.get(module) or wrap(candidates[module], SlotContext(), module)
        if layer.bias_features is None or tuple(t.shape) != (layer.bias_features,):
            raise ShapeMismatchError(f"{label}: {peft_key(module, 'bias', False)!r} has shape "
                                     f"{tuple(t.shape)}; {module!r} takes no such LoRA bias")
    saved = saved_modules(model, adapter.config.modules_to_save)
    for module in saved:
        if module not in adapter.copies:
            raise MissingKeyError(f"{label}: modules_to_save selects {module!r}, but "
                                  f"{copy_key(module, 'weight')!r} is missing")
        if module in adapter.weights or module in existing:
            raise UnexpectedKeyError(f"{label}: {module!r} is adapted by LoRA and cannot also "
                                     "be one of modules_to_save")
    copies = copy_layers(model)
    for module, parts in adapter.copies.items():
        if module not in saved:
            raise UnexpectedKeyError(f"{label}: {copy_key(module, 'weight')!r} names module "
                                     f"{module!r}, which the model does not have")
        check_copy_shapes(label, module, parts, copies.get(module), model)
    check_tokens_against(label, model, adapter.config, adapter.tokens,
                         set(adapter.weights) | set(adapter.copies))
