"""The "which matrices x what rank" plane, as numbers: adapter parameters and file sizes.

Computed from shapes alone, so planning rank 64 on a large model allocates nothing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from torch import nn

from loratree.layers import LoraEmbedding, SlotContext
from loratree.surgery.inject import wrap
from loratree.surgery.targets import find_targets

__all__ = ["DEFAULT_RANKS", "STANDARD_TARGETS", "PlanRow", "adapter_size", "rank_plane"]

DEFAULT_RANKS = (1, 2, 4, 8, 16, 32, 64)
STANDARD_TARGETS: dict[str, tuple[str, ...]] = {
    "q,v": ("q_proj", "v_proj"),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "all-linear": ("all-linear",),
}


@dataclass(frozen=True)
class PlanRow:
    """One point of the plane."""

    targets: str
    rank: int
    layers: int
    params: int
    file_bytes: int
    model_params: int

    @property
    def fraction(self) -> float:
        return self.params / max(self.model_params, 1)


def adapter_size(
    model: nn.Module, targets: tuple[str, ...], rank: int, bytes_per_value: int = 4
) -> tuple[int, int, int]:
    """(layers, parameters, safetensors file bytes) of one adapter of ``rank`` on ``targets``.

    The file size counts the tensor data plus the JSON header, as PEFT's key names make it.
    """
    chosen = find_targets(model, targets)
    params, header = 0, {"__metadata__": {"format": "pt"}}
    offset = 0
    dtype = {2: "BF16", 4: "F32"}.get(bytes_per_value, "F32")
    for name, module in chosen.items():
        layer = wrap(module, SlotContext(), name)
        emb = isinstance(layer, LoraEmbedding)
        for part, shape in (("A", layer.a_shape(rank)), ("B", layer.b_shape(rank))):
            n = math.prod(shape)
            key = f"base_model.model.{name}." + (f"lora_embedding_{part}" if emb else
                                                  f"lora_{part}.weight")
            header[key] = {"dtype": dtype, "shape": list(shape),
                           "data_offsets": [offset, offset + n * bytes_per_value]}
            offset += n * bytes_per_value
            params += n
    header_len = len(json.dumps(header, separators=(",", ":")))
    header_len += (-header_len) % 8  # safetensors pads the header to 8 bytes
    return len(chosen), params, 8 + header_len + offset


def rank_plane(
    model: nn.Module,
    target_sets: dict[str, tuple[str, ...]],
    ranks: tuple[int, ...] = DEFAULT_RANKS,
) -> list[PlanRow]:
    """Adapter size for every (targets, rank) pair; target sets that match nothing are skipped."""
    total = sum(p.numel() for p in model.parameters())
    rows = []
    for label, targets in target_sets.items():
        try:
            find_targets(model, targets)
        except ValueError:
            continue
        for r in ranks:
            layers, params, size = adapter_size(model, targets, r)
            rows.append(PlanRow(label, r, layers, params, size, total))
    return rows
