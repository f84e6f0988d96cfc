"""One ``LoraConfig`` for the per-layer specs of a slot, and the shortest PEFT
``target_modules`` naming its layers: what a saved adapter's config says."""

from __future__ import annotations

import re
from collections import Counter

from torch import nn

from loratree.config import LoraConfig
from loratree.surgery import adaptable_modules

__all__ = ["summarize", "target_modules"]


def summarize(specs: dict[str, object], params: frozenset[str] = frozenset(),
              saved: tuple[str, ...] = ()) -> LoraConfig:
    """One config for per-layer specs; ``params`` of them are adapted parameters,
    ``saved`` the modules with full copies."""
    ranks = Counter(s.rank for s in specs.values())
    alphas = Counter(s.alpha for s in specs.values())
    dropouts = {s.dropout for s in specs.values()}
    rslora = {s.rslora for s in specs.values()}
    if len(rslora) > 1:
        raise ValueError("cannot save one adapter that mixes rsLoRA and plain LoRA scaling")
    dora = {s.dora for s in specs.values()}
    if len(dora) > 1:
        raise ValueError("cannot save one adapter that mixes DoRA and plain LoRA layers")
    biased = {s.bias for s in specs.values()}
    if len(biased) > 1:
        raise ValueError("cannot save one adapter with a LoRA bias on some layers only "
                         "(PEFT's lora_bias holds for every adapted layer)")
    rank, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    return LoraConfig(
        rank=rank,
        alpha=alpha,
        dropout=max(dropouts),
        targets=tuple(n for n in specs if n not in params),
        target_parameters=tuple(n for n in specs if n in params),
        use_rslora=rslora.pop(),
        use_dora=dora.pop(),
        lora_bias=biased.pop(),
        modules_to_save=saved,
        rank_pattern={re.escape(n): s.rank for n, s in specs.items() if s.rank != rank},
        alpha_pattern={re.escape(n): s.alpha for n, s in specs.items() if s.alpha != alpha},
    )


def target_modules(model: nn.Module, names: list[str]) -> list[str] | str:
    """The shortest PEFT ``target_modules`` that selects exactly ``names`` in this model."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = {n for n in adaptable_modules(model) if any(
        n == s or n.endswith("." + s) for s in suffixes
    )}
    if selected == set(names):
        return suffixes
    return "|".join(re.escape(n) for n in names)
