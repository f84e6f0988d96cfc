"""Frozen, JSON-serializable configuration dataclasses.

Each validates itself in ``__post_init__`` and raises ``ValueError`` naming the field and
the value. Problems are collected and raised together, so a user fixes them in one pass.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["LoraConfig", "PrefixConfig", "QuantConfig", "token_problems"]

InitKind = Literal["kaiming", "gaussian"]


@dataclass(frozen=True)
class LoraConfig:
    """One LoRA adapter: what to adapt and how.

    ``y = W x + scale * B (A x)`` with ``scale = alpha / r`` (or ``alpha / sqrt(r)`` when
    ``use_rslora``).
    """

    rank: int = 8
    """r: rows of A and columns of B."""
    alpha: float = 16.0
    """Numerator of the scale."""
    dropout: float = 0.0
    """Dropout on the LoRA branch's input during training."""
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    """Which modules to adapt. Each entry is one of: a module-name suffix (``q_proj`` matches
    ``model.layers.0.self_attn.q_proj``), a glob (``*.mlp.*``), ``re:<regex>`` matched
    against the full name, ``type:<ClassName>``, or ``all-linear`` (every linear layer but
    the output head)."""
    exclude: tuple[str, ...] = ()
    """Patterns, as in ``targets``, of modules never to adapt."""
    use_rslora: bool = False
    """Scale by alpha / sqrt(r) (rank-stabilized LoRA) instead of alpha / r."""
    init: InitKind = "kaiming"
    """Initialisation of A. B is always zero, so a fresh adapter is an exact no-op."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides: module-name suffix or regex -> rank (PEFT's semantics)."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides, as ``rank_pattern``."""
    use_dora: bool = False
    """DoRA (PEFT's ``use_dora``): each adapted linear or convolution layer also learns a
    magnitude per output feature (channel), ``y = bias + m / ||W + s B A|| * (W x + s B A x)``."""
    lora_bias: bool = False
    """PEFT's ``lora_bias``: every adapted linear layer's B gets a trainable bias b, and
    the branch becomes ``scale * (B A x + b)`` (merging adds ``scale * b`` to the base
    bias, so it needs a base layer with a bias)."""
    modules_to_save: tuple[str, ...] = ()
    """PEFT's ``modules_to_save``: modules (name suffixes, e.g. ``lm_head``) this adapter
    replaces by a full trainable copy of its own (a Linear or an Embedding)."""
    target_parameters: tuple[str, ...] = ()
    """Parameters to adapt directly (PEFT's ``target_parameters``), for modules that are not
    linear layers: fused MoE experts (``mlp.experts.gate_up_proj``, 3-D, one update per
    expert) or routers (``mlp.gate.weight``). Each entry is a full parameter name or a
    suffix of one after a dot. ``all-linear`` adds these on the MoE models where PEFT
    does (see docs/adapters.md)."""
    trainable_token_indices: tuple[int, ...] | dict[str, tuple[int, ...]] = ()
    """PEFT's ``trainable_token_indices``: token ids whose rows of the input embedding
    this adapter replaces by trainable rows of its own (a list), or per module name (a
    module name or suffix, e.g. ``embed_tokens``) its ids (a dict). A head tied to the
    embedding uses the same rows."""

    def __post_init__(self) -> None:
        for name in ("targets", "exclude", "target_parameters"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if isinstance(self.modules_to_save, str):
            object.__setattr__(self, "modules_to_save", (self.modules_to_save,))
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save or ()))
        tokens = self.trainable_token_indices
        if isinstance(tokens, dict):
            tokens = {k: tuple(v) if isinstance(v, list | tuple) else v
                      for k, v in tokens.items()}
        elif isinstance(tokens, list | tuple):
            tokens = tuple(tokens)
        object.__setattr__(self, "trainable_token_indices", tokens or ())
        problems = self._feature_problems()
        if not isinstance(self.rank, int) or self.rank < 1:
            problems.append(f"rank must be a positive int, got {self.rank!r}")
        if not _finite_number(self.alpha) or self.alpha <= 0:
            problems.append(f"alpha must be a positive number, got {self.alpha!r}")
        if not _finite_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not (self.targets or self.target_parameters) or not all(
                isinstance(t, str) and t for t in self.targets):
            problems.append(f"targets must be non-empty strings, got {self.targets!r}")
        if not all(isinstance(t, str) and t for t in self.target_parameters):
            problems.append("target_parameters must be non-empty strings, got "
                            f"{self.target_parameters!r}")
        if self.init not in ("kaiming", "gaussian"):
            problems.append(f"init must be 'kaiming' or 'gaussian', got {self.init!r}")
        problems += _pattern_problems(self.rank_pattern, self.alpha_pattern)
        if problems:
            raise ValueError("invalid LoraConfig: " + "; ".join(problems))

    def _feature_problems(self) -> list[str]:
        """What is wrong with the PEFT feature flags (DoRA, LoRA bias, full copies)."""
        problems = []
        for name in ("use_dora", "lora_bias"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.use_dora is True and self.lora_bias is True:
            problems.append("use_dora and lora_bias cannot be combined (DoRA rescales the "
                            "whole layer output)")
        if not all(isinstance(m, str) and m for m in self.modules_to_save):
            problems.append(f"modules_to_save must be module names, got {self.modules_to_save!r}")
        return problems + token_problems(self.trainable_token_indices)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def token_problems(tokens: object) -> list[str]:
    """What is wrong with a ``trainable_token_indices`` value: it must be a list of distinct
    token ids (ints >= 0), or a dict of module names to such lists."""
    name = "trainable_token_indices"
    if tokens == ():
        return []
    if isinstance(tokens, tuple):
        groups = {"": tokens}
    elif isinstance(tokens, dict):
        groups = tokens
    else:
        return [f"{name} must be a list of token ids or a dict of them, got {tokens!r}"]
    problems = []
    for key, ids in groups.items():
        label = f"{name}[{key!r}]" if key else name
        if not isinstance(key, str) or (isinstance(tokens, dict) and not key):
            problems.append(f"{name}: keys must be module names, got {key!r}")
        elif not isinstance(ids, tuple) or not ids or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            problems.append(f"{label} must be a non-empty list of token ids >= 0, got {ids!r}")
        elif len(set(ids)) != len(ids):
            twice = sorted({i for i in ids if ids.count(i) > 1})
            problems.append(f"{label} repeats token ids {twice[:8]}")
    return problems


def _finite_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _pattern_problems(rank_pattern: dict, alpha_pattern: dict) -> list[str]:
    problems = []
    for key, r in rank_pattern.items():
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            problems.append(f"rank_pattern[{key!r}] must be a positive int, got {r!r}")
    for key, a in alpha_pattern.items():
        if not _finite_number(a) or a <= 0:
            problems.append(f"alpha_pattern[{key!r}] must be a positive number, got {a!r}")
    return problems


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a frozen base: NF4 (QLoRA) on the chosen linear layers."""

    targets: tuple[str, ...] = ("all-linear",)
    """Linear layers to quantize, as ``LoraConfig.targets``; ``all-linear`` leaves the output
    head in float (embeddings are never linear, so they stay float too)."""
    exclude: tuple[str, ...] = ()
    """Patterns of modules to keep in float."""
    block: int = 64
    """Values per absmax block of the 4-bit codes."""
    double: bool = True
    """Quantize the block absmax constants too (8 bits, blocks of 256): ~4.13 bits/param."""

    def __post_init__(self) -> None:
        for name in ("targets", "exclude"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        problems = []
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            problems.append(f"targets must be non-empty strings, got {self.targets!r}")
        if self.block not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            problems.append(f"block must be a power of two in 32..4096, got {self.block!r}")
        if not isinstance(self.double, bool):
            problems.append(f"double must be a bool, got {self.double!r}")
        if problems:
            raise ValueError("invalid QuantConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PrefixPositions = Literal["shift", "keep"]
PrefixInit = Literal["vocab", "random"]


@dataclass(frozen=True)
class PrefixConfig:
    """One prefix-tuning adapter: ``n_virtual`` trained key/value vectors per attention layer.

    The model is frozen; every token attends to the prefix before the prompt.
    """

    n_virtual: int = 20
    """Virtual tokens P: the prefix length (PEFT's ``num_virtual_tokens``)."""
    projection: bool = False
    """Train through the paper's reparametrization: an embedding of P vectors, then a
    two-layer MLP (Linear, tanh, Linear) to every layer's keys and values. Folded into
    plain vectors when saved."""
    encoder_hidden: int | None = None
    """Hidden width of that MLP (default: the key/value width, as PEFT)."""
    init: PrefixInit = "vocab"
    """"vocab": start from the model's own keys and values for P random vocabulary tokens
    (the paper's advice: real activations train faster and more stably than noise);
    "random": N(0, 1) as PEFT does."""
    positions: PrefixPositions = "shift"
    """Positions of the prompt tokens: "shift" starts them at P, as PEFT does (so adapters
    move between PEFT and loratree unchanged); "keep" starts them at 0, exactly as with no
    prefix. Saved adapters record "keep" in an extra config key that PEFT ignores."""

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.n_virtual, int) or isinstance(self.n_virtual, bool) or (
            self.n_virtual < 1
        ):
            problems.append(f"n_virtual must be a positive int, got {self.n_virtual!r}")
        if not isinstance(self.projection, bool):
            problems.append(f"projection must be a bool, got {self.projection!r}")
        if self.encoder_hidden is not None and (
            not isinstance(self.encoder_hidden, int) or self.encoder_hidden < 1
        ):
            problems.append(f"encoder_hidden must be a positive int, got {self.encoder_hidden!r}")
        if self.init not in ("vocab", "random"):
            problems.append(f"init must be 'vocab' or 'random', got {self.init!r}")
        if self.positions not in ("shift", "keep"):
            problems.append(f"positions must be 'shift' or 'keep', got {self.positions!r}")
        if problems:
            raise ValueError("invalid PrefixConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
