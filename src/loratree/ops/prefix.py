"""Prefix-tuning as tensors: flat prefix vectors -> per-layer keys and values, masks, positions.

A prefix adapter is one matrix E of shape (P, L * 2 * H * D): P virtual tokens, L attention
layers, key and value, H key/value heads (the *kv* heads under grouped-query attention),
head dim D. It is PEFT's ``prompt_embeddings`` layout: for layer i,

    key_i[h, t, d]   = E[t, ((2 i)     * H + h) * D + d]
    value_i[h, t, d] = E[t, ((2 i + 1) * H + h) * D + d]

Every query attends to the P prefix keys before the prompt's own. The keys are used as
stored (no rotary embedding is applied to them), so a prefix has no position of its own.

Rows of one batch may carry different prefixes (or none): they are padded to the longest,
the padding masked out. ``prompt_positions`` gives each row's prompt tokens their positions,
either starting at the row's prefix length (``shift``: PEFT's convention, which prefix
adapters are trained with there) or at 0 (``keep``: exactly the positions without a
prefix).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["extend_mask", "layer_kv", "pad_prefixes", "prompt_positions", "split_layers"]


def split_layers(e: Tensor, n_layers: int, n_heads: int, head_dim: int) -> Tensor:
    """View flat prefix vectors as (layer, key|value, head, token, dim).

    Semantics: out[i, j, h, t, d] = e[t, ((2 i + j) * H + h) * D + d].
    Shape: e (P, L * 2 * H * D) -> (L, 2, H, P, D), a view (permuted, not copied).
    """
    p, width = e.shape
    if width != n_layers * 2 * n_heads * head_dim:
        raise ValueError(f"prefix width {width} != layers {n_layers} x 2 x heads {n_heads} x "
                         f"head_dim {head_dim}")
    return e.view(p, n_layers, 2, n_heads, head_dim).permute(1, 2, 3, 0, 4)


def layer_kv(e: Tensor, n_layers: int, n_heads: int, head_dim: int,
             batch: int) -> list[tuple[Tensor, Tensor]]:
    """Every layer's (key, value) for a batch in which all rows use one prefix.

    Semantics: key_i[b, h, t, d] = e[t, (2 i H + h) D + d]; value_i likewise at 2 i + 1.
    Shape: e (P, L * 2 * H * D) -> L pairs of (batch, H, P, D) (expanded views, no copy).
    """
    kv = split_layers(e, n_layers, n_heads, head_dim)
    return [(kv[i, 0].unsqueeze(0).expand(batch, -1, -1, -1),
             kv[i, 1].unsqueeze(0).expand(batch, -1, -1, -1)) for i in range(n_layers)]


def pad_prefixes(
    prefixes: Sequence[Tensor | None], n_layers: int, n_heads: int, head_dim: int
) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
    """Per-row prefixes of different lengths (or None) as one padded set of keys/values.

    Row b's prefix occupies the last P_b of the P_max prefix positions; the first
    P_max - P_b are zeros and masked out.
    Semantics: key_i[b, h, P_max - P_b + t, d] = prefixes[b][t, (2 i H + h) D + d];
    mask[b, s] = 1 iff s >= P_max - P_b.
    Shape: B tensors (P_b, L * 2 * H * D) or None -> L pairs of (B, H, P_max, D), and
    mask (B, P_max) long.
    """
    lengths = [0 if e is None else e.shape[0] for e in prefixes]
    p_max = max(lengths, default=0)
    ref = next((e for e in prefixes if e is not None), None)
    if ref is None:
        raise ValueError("pad_prefixes needs at least one row with a prefix")
    batch = len(prefixes)
    keys = ref.new_zeros(n_layers, batch, n_heads, p_max, head_dim)
    values = torch.zeros_like(keys)
    rows_k, rows_v = [], []
    for b, e in enumerate(prefixes):
        if e is None:
            rows_k.append(keys[:, b])
            rows_v.append(values[:, b])
            continue
        kv = split_layers(e.to(ref.dtype), n_layers, n_heads, head_dim)  # (L, 2, H, P_b, D)
        pad = ref.new_zeros(n_layers, n_heads, p_max - e.shape[0], head_dim)
        rows_k.append(torch.cat([pad, kv[:, 0]], dim=2))
        rows_v.append(torch.cat([pad, kv[:, 1]], dim=2))
    k_all = torch.stack(rows_k, dim=1)  # (L, B, H, P_max, D); stack keeps autograd
    v_all = torch.stack(rows_v, dim=1)
    arange = torch.arange(p_max, device=ref.device)
    starts = torch.tensor([p_max - n for n in lengths], device=ref.device)
    mask = (arange.unsqueeze(0) >= starts.unsqueeze(1)).long()
    return [(k_all[i], v_all[i]) for i in range(n_layers)], mask


def extend_mask(prefix_mask: Tensor, attention_mask: Tensor | None, seq_len: int) -> Tensor:
    """The attention mask over [prefix | prompt] positions.

    Semantics: out[b] = concat(prefix_mask[b], attention_mask[b] or ones(T)).
    Shape: prefix_mask (B, P), attention_mask (B, T) or None -> (B, P + T), the dtype of
    attention_mask (long without one).
    """
    batch = prefix_mask.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones(batch, seq_len, dtype=torch.long, device=prefix_mask.device)
    return torch.cat([prefix_mask.to(attention_mask.dtype), attention_mask], dim=1)


def prompt_positions(attention_mask: Tensor | None, lengths: Tensor, shift: bool,
                     seq_len: int | None = None) -> Tensor:
    """Position ids of the prompt tokens, padding-aware.

    Semantics: pos[b, t] = (lengths[b] if shift else 0) + (number of real tokens in
    row b up to and including t) - 1, clamped at that start for padding tokens.
    Shape: attention_mask (B, T) or None (all ones; then ``seq_len`` gives T), lengths (B,)
    -> (B, T) long.
    """
    if attention_mask is None:
        if seq_len is None:
            raise ValueError("prompt_positions needs an attention mask or seq_len")
        counts = torch.arange(seq_len, device=lengths.device).unsqueeze(0).expand(
            lengths.shape[0], -1)
    else:
        counts = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    start = lengths.long().unsqueeze(1) if shift else torch.zeros_like(lengths).long().unsqueeze(1)
    return counts + start
