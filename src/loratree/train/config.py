"""The training configuration: a frozen dataclass, loadable from TOML, overridable by flags."""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from loratree.adapters.card_files import CardError, card_fields
from loratree.config import LoraConfig, PrefixConfig, token_problems

__all__ = ["TrainConfig"]

Method = Literal["lora", "prefix", "full"]
Precision = Literal["fp32", "bf16"]
Quantize = Literal["nf4"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs. Paths are strings so the config stays JSON."""

    data: str = ""
    """Training JSONL: {"prompt", "completion"} or {"messages": [...]} per line."""
    out: str = "adapters/run"
    """Output directory: the adapter, checkpoints/, metrics.jsonl and loss.png."""
    eval_data: str | None = None
    """Held-out JSONL for eval loss and exact match."""
    model: str | None = None
    """HF directory or .gguf file; None for the embedded SmolLM2."""
    parent: str | None = None
    """Train a tree node on top of this adapter of ``store`` (its whole root-to-parent
    path, frozen, runs under the new adapter; only the new A and B learn). LoRA only."""
    store: str = "adapters"
    """The adapter store that holds ``parent`` and receives ``node``."""
    node: str | None = None
    """When set, the trained adapter is also added to ``store`` under this name (a child
    of ``parent`` is named ``<parent>/<child>``)."""
    method: Method = "lora"
    """"lora"; "prefix" (prefix-tuning: trained key/value vectors per attention layer); or
    "full" fine-tuning (every weight trainable: the far corner of the plane)."""
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("all-linear",)
    use_rslora: bool = False
    use_dora: bool = False
    """DoRA: also learn a magnitude per output feature of each adapted linear layer."""
    lora_bias: bool = False
    """PEFT's ``lora_bias``: B also learns a bias in each adapted linear layer (not with
    ``use_dora``: PEFT refuses the pair)."""
    modules_to_save: tuple[str, ...] = ()
    """Modules trained as full copies beside the LoRA factors (PEFT's ``modules_to_save``,
    such as ``("lm_head",)``); saved under the module's own name. LoRA only."""
    trainable_tokens: tuple[int, ...] = ()
    """PEFT's ``trainable_token_indices``: token ids whose rows of the input embedding (and
    of a head tied to it) the adapter learns, beside its LoRA layers (LoRA only)."""
    virtual_tokens: int = 20
    """Prefix-tuning: virtual tokens per attention layer."""
    prefix_projection: bool = False
    """Prefix-tuning: train through the MLP reparametrization (folded on save)."""
    prefix_positions: Literal["shift", "keep"] = "shift"
    """Prefix-tuning: prompt positions start at the prefix length (PEFT's) or at 0."""
    max_length: int = 256
    """Examples longer than this many tokens are truncated (and counted)."""
    batch_size: int = 8
    """Examples per optimizer step (the global batch, over accumulation and processes)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_steps: int = 100
    clip_norm: float = 1.0
    """Clip the gradient norm to this; 0 disables clipping."""
    precision: Precision = "fp32"
    quantize: Quantize | None = None
    """"nf4": quantize the base's linear layers to 4-bit NF4 first (QLoRA; LoRA only)."""
    device: str | None = None
    """"cpu", "cuda" or "cuda:N"; None picks CUDA when it is present (under torchrun, each
    process's local GPU), else the CPU."""
    seed: int = 0
    group_by_length: bool = False
    skip_bad_rows: bool = False
    eval_every: int = 50
    save_every: int = 50
    keep_last: int = 2
    eval_examples: int = 64
    """How many held-out examples to generate for exact match (0: eval loss only)."""
    max_new_tokens: int = 48
    grow: bool = False
    """Start at ``rank`` and double it when the eval loss stops improving (LoRA only; needs
    eval data). Growing keeps the function (new B columns are zero) and the scale (alpha
    grows with the rank), and keeps the optimizer state of the existing entries. The learning
    rate is constant after warmup (no cosine decay)."""
    grow_max_rank: int = 64
    """With ``grow``: never grow past this rank; a stall at it stops training."""
    grow_patience: int = 1
    """With ``grow``: evaluations without improvement before growing (or stopping)."""
    grow_tolerance: float = 0.0
    """With ``grow``: an eval-loss drop smaller than this does not count as improvement."""
    display_name: str | None = None
    """The adapter's name in the chat app (written to its ``card.json``)."""
    description: str | None = None
    """One line about the adapter for the chat app (written to its ``card.json``)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        saved = self.modules_to_save
        object.__setattr__(self, "modules_to_save",
                           (saved,) if isinstance(saved, str) else tuple(saved))
        tokens = self.trainable_tokens
        object.__setattr__(self, "trainable_tokens",
                           tuple(tokens) if isinstance(tokens, list | tuple) else tokens)
        problems = (_number_problems(self) + _grow_problems(self) + _tree_problems(self)
                    + _feature_problems(self))
        problems += _card_problems(self)
        problems += [p.replace("trainable_token_indices", "trainable_tokens")
                     for p in token_problems(self.trainable_tokens)]
        if self.trainable_tokens and self.method != "lora":
            problems.append(f"trainable_tokens needs method 'lora', got {self.method!r}")
        if self.method not in ("lora", "prefix", "full"):
            problems.append(f"method must be 'lora', 'prefix' or 'full', got {self.method!r}")
        if self.prefix_positions not in ("shift", "keep"):
            problems.append(f"prefix_positions must be 'shift' or 'keep', got "
                            f"{self.prefix_positions!r}")
        if self.precision not in ("fp32", "bf16"):
            problems.append(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            problems.append(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.quantize not in (None, "nf4"):
            problems.append(f"quantize must be 'nf4' or None, got {self.quantize!r}")
        elif self.quantize and self.method == "full":
            problems.append("quantize='nf4' needs an adapter method: a 4-bit base stays frozen")
        if not problems and self.batch_size % self.grad_accum:
            problems.append(
                f"batch_size {self.batch_size} must be a multiple of grad_accum {self.grad_accum}"
            )
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))

    def lora(self) -> LoraConfig:
        return LoraConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                          targets=self.targets, use_rslora=self.use_rslora,
                          use_dora=self.use_dora, lora_bias=self.lora_bias,
                          modules_to_save=self.modules_to_save,
                          trainable_token_indices=self.trainable_tokens)

    def prefix(self) -> PrefixConfig:
        return PrefixConfig(n_virtual=self.virtual_tokens, projection=self.prefix_projection,
                            positions=self.prefix_positions)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Read a TOML file (top-level keys, or a [train] table), then apply overrides."""
        with open(path, "rb") as f:
            raw = tomllib.load(f)
        raw = raw.get("train", raw)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown setting(s) {unknown}")
        return cls(**{**raw, **{k: v for k, v in overrides.items() if v is not None}})


def _number_problems(c: TrainConfig) -> list[str]:
    problems = []
    positive = ("rank", "virtual_tokens", "max_length", "batch_size", "grad_accum", "max_steps",
                "eval_every", "save_every", "keep_last", "max_new_tokens")
    for name in positive:
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{name} must be a positive int, got {value!r}")
    for name in ("warmup_steps", "eval_examples"):
        value = getattr(c, name)
        if not isinstance(value, int) or value < 0:
            problems.append(f"{name} must be an int >= 0, got {value!r}")
    for name, least in (("lr", 0), ("alpha", 0), ("weight_decay", None), ("clip_norm", None)):
        value = getattr(c, name)
        number = isinstance(value, int | float) and math.isfinite(value)
        if not number or value < 0 or (least is not None and value <= least):
            kind = "a positive" if least is not None else "a non-negative"
            problems.append(f"{name} must be {kind} number, got {value!r}")
    return problems


def _grow_problems(c: TrainConfig) -> list[str]:
    problems = []
    for name in ("grow_max_rank", "grow_patience"):
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{name} must be a positive int, got {value!r}")
    tol = c.grow_tolerance
    if not (isinstance(tol, int | float) and math.isfinite(tol)) or tol < 0:
        problems.append(f"grow_tolerance must be a non-negative number, got {tol!r}")
    if c.grow and c.method != "lora":
        problems.append(f"grow needs method 'lora', got {c.method!r}")
    if c.grow and not problems and isinstance(c.rank, int) and c.grow_max_rank < c.rank:
        problems.append(f"grow_max_rank {c.grow_max_rank} must be >= rank {c.rank}")
    return problems


def _tree_problems(c: TrainConfig) -> list[str]:
    problems = []
    if c.parent is not None and c.method != "lora":
        problems.append(f"parent (a tree node) needs method 'lora', got {c.method!r}")
    if c.node is not None and c.parent is not None and (
            "/" not in c.node or c.node.rsplit("/", 1)[0] != c.parent):
        problems.append(f"node {c.node!r} must be named '{c.parent}/<name>' (a child of "
                        f"parent {c.parent!r})")
    return problems


def _feature_problems(c: TrainConfig) -> list[str]:
    """PEFT's LoRA extras: which methods and which pairs they take."""
    problems = []
    if c.modules_to_save and (c.method != "lora" or c.parent is not None):
        problems.append("modules_to_save needs method 'lora' and no parent (a tree node "
                        "composes LoRA factors only)")
    if c.use_dora and c.lora_bias:
        problems.append("use_dora and lora_bias cannot be combined (PEFT refuses the pair: "
                        "DoRA rescales the whole layer output)")
    return problems


def _card_problems(c: TrainConfig) -> list[str]:
    """What is wrong with the card fields (display_name, description), if any."""
    try:
        card_fields(c.display_name, c.description)
    except CardError as e:
        return [str(e)]
    return []
