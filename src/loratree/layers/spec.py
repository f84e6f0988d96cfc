"""The hyperparameters of one adapter slot of a LoRA layer."""

from __future__ import annotations

from dataclasses import dataclass

from loratree.ops import lora as lora_ops

__all__ = ["SlotSpec"]


@dataclass(frozen=True)
class SlotSpec:
    """The hyperparameters of one slot."""

    rank: int
    """0 marks an empty slot: the adapter in this slot does not touch this layer."""
    alpha: float
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False
    """DoRA: the slot also holds a magnitude ``m`` ``(out,)`` (``layers.dora``)."""
    bias: bool = False
    """PEFT's ``lora_bias``: B carries a bias b, and the branch is s * (B A x + b)."""

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0 (0: the slot skips this layer), got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return lora_ops.scale(self.alpha, self.rank, self.rslora) if self.rank else 0.0
