"""Prefix adapters as modules: one encoder per adapter, and the bank that holds them by slot.

``PrefixEncoder`` yields a prefix's flat vectors (P, L * 2 * H * D) in PEFT's layout (see
``ops.prefix``), either as plain trained vectors or through the paper's reparametrization
(an embedding of P vectors, then Linear, tanh, Linear), which ``fold`` turns into plain
vectors. ``PrefixBank`` holds the encoders of one model by slot, beside its LoRA slots, so
a slot index means one adapter whatever its kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from loratree.layers.context import SlotContext

__all__ = ["PrefixBank", "PrefixEncoder", "PrefixGeometry"]


@dataclass(frozen=True)
class PrefixGeometry:
    """The attention shape a prefix must fit: layers, key/value heads, head dim."""

    n_layers: int
    n_heads: int
    head_dim: int

    @property
    def token_dim(self) -> int:
        """Width of one layer's key (or value) for one virtual token: H * D."""
        return self.n_heads * self.head_dim

    @property
    def width(self) -> int:
        """Width of a prefix row over all layers, keys and values: L * 2 * H * D."""
        return self.n_layers * 2 * self.token_dim


class PrefixEncoder(nn.Module):
    """The trainable part of one prefix adapter; ``forward()`` gives (P, L * 2 * H * D)."""

    def __init__(self, n_virtual: int, geometry: PrefixGeometry, *, projection: bool = False,
                 hidden: int | None = None) -> None:
        super().__init__()
        self.n_virtual, self.geometry, self.projection = n_virtual, geometry, projection
        if projection:
            hidden = hidden or geometry.token_dim
            self.embedding = nn.Parameter(torch.randn(n_virtual, geometry.token_dim))
            self.mlp = nn.Sequential(nn.Linear(geometry.token_dim, hidden), nn.Tanh(),
                                     nn.Linear(hidden, geometry.width))
        else:
            self.vectors = nn.Parameter(torch.randn(n_virtual, geometry.width))

    def forward(self) -> Tensor:
        if self.projection:
            return self.mlp(self.embedding)
        return self.vectors

    @torch.no_grad()
    def fold(self) -> Tensor:
        """The plain prefix vectors this encoder yields now (what a saved file holds)."""
        return self().detach().clone()

    @torch.no_grad()
    def start_from(self, vectors: Tensor) -> None:
        """Initialise so that ``forward()`` starts at (about) ``vectors`` (P, width).

        Plain vectors are copied. Through the MLP the output starts at the mean of
        ``vectors`` (the last bias) plus a small per-token part, so the virtual tokens begin
        near real activations and separate as they train.
        """
        if vectors.shape != (self.n_virtual, self.geometry.width):
            raise ValueError(f"prefix vectors {tuple(vectors.shape)} do not fit "
                             f"({self.n_virtual}, {self.geometry.width})")
        if not self.projection:
            self.vectors.copy_(vectors)
            return
        last = self.mlp[2]
        last.bias.copy_(vectors.mean(0))
        last.weight.mul_(0.01)

    def extra_repr(self) -> str:
        return (f"n_virtual={self.n_virtual}, width={self.geometry.width}, "
                f"projection={self.projection}")


class PrefixBank(nn.Module):
    """The prefix adapters of one model, by slot; slots without a prefix hold nothing.

    Registered as a submodule of the model (so ``.to()``, ``parameters()`` and DDP see the
    encoders); target search skips it, so its MLPs are never mistaken for model layers.
    """

    def __init__(self, geometry: PrefixGeometry, ctx: SlotContext) -> None:
        super().__init__()
        self.geometry, self.ctx = geometry, ctx
        self.encoders = nn.ModuleDict()
        self.n_slots = 0
        self.modes: dict[int, str] = {}

    def add(self, encoder: PrefixEncoder, slot: int, positions: str) -> None:
        """Put ``encoder`` in ``slot`` (the bank grows to reach it)."""
        if encoder.geometry != self.geometry:
            raise ValueError(f"prefix geometry {encoder.geometry} does not fit the model's "
                             f"{self.geometry}")
        self.encoders[str(slot)] = encoder
        self.modes[slot] = positions
        self.n_slots = max(self.n_slots, slot + 1)

    def pad_to(self, n_slots: int) -> None:
        """Let slots up to ``n_slots - 1`` exist (without a prefix)."""
        self.n_slots = max(self.n_slots, n_slots)

    def encoder(self, slot: int) -> PrefixEncoder | None:
        return self.encoders[str(slot)] if str(slot) in self.encoders else None  # type: ignore[return-value]

    def slots(self) -> list[int]:
        return sorted(int(k) for k in self.encoders)

    def remove(self, slot: int) -> None:
        del self.encoders[str(slot)]
        self.modes.pop(slot, None)
