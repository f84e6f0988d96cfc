"""LoRA on an embedding table: ``E' = E + s * (B A)^T``, looked up row by row."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from loratree.layers.base import LoraModule
from loratree.layers.context import SlotContext

__all__ = ["LoraEmbedding"]


class LoraEmbedding(LoraModule):
    """``y = E[ids] + s * (A^T[ids]) B^T`` with A ``(r, num_embeddings)``, B ``(dim, r)``.

    The shapes are PEFT's ``lora_embedding_A`` / ``lora_embedding_B``. Dropout does not
    apply to an index lookup, so a slot's dropout is ignored here, as in PEFT.
    """

    def __init__(self, base: nn.Embedding, ctx: SlotContext, name: str = "") -> None:
        super().__init__(base, ctx, name)
        self.num_embeddings, self.embedding_dim = base.weight.shape

    def a_shape(self, rank: int) -> tuple[int, ...]:
        return (rank, self.num_embeddings)

    def b_shape(self, rank: int) -> tuple[int, ...]:
        return (self.embedding_dim, rank)

    def tokens(self, x: Tensor) -> tuple[int, Tensor]:
        return x.shape[0], x.reshape(-1)  # (N,) ids

    def branch(self, x: Tensor, slot: int) -> Tensor:
        a, b = self.lora_a[slot], self.lora_b[slot]
        base = self.base
        h = F.embedding(  # (..., r)
            x, a.t(), base.padding_idx, base.max_norm, base.norm_type,
            base.scale_grad_by_freq, base.sparse,
        )
        return h @ b.t() * self.specs[slot].scale  # (..., dim)

    def to_weight_layout(self, delta: Tensor) -> Tensor:
        return delta.t()  # (dim, num_embeddings) -> the table's (num_embeddings, dim)
