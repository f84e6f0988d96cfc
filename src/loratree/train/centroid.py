"""The routing centroid a trained adapter gets beside it (``routing.json``): where serving
sends ``adapter="auto"`` requests (``serve.router``).

The centroid is the mean of the base model's features over the adapter's first training
prompts, every adapter off, so it depends on the base and the prompts alone: jobs of one
fused run that train on the same data share one computation (``Features``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor, nn

from loratree.adapters.routing_files import write_centroid
from loratree.models.chat import IGNORE_INDEX, Example
from loratree.surgery.features import prompt_features

__all__ = ["ROUTING_PROMPTS", "Features", "routing_prompts", "save_centroid"]

ROUTING_PROMPTS = 256
"""Training prompts whose base-model features make the adapter's routing centroid."""

Prompts = tuple[tuple[int, ...], ...]
Features = dict[Prompts, Tensor]
"""Base-model features already computed, by their prompts."""


def routing_prompts(examples: Sequence[Example]) -> Prompts:
    """The prompt part (the tokens before the first labelled one) of the first
    ``ROUTING_PROMPTS`` examples that have one."""
    prompts = []
    for e in examples[:ROUTING_PROMPTS]:
        first = next((i for i, lab in enumerate(e.labels) if lab != IGNORE_INDEX),
                     len(e.labels))
        if first > 0:
            prompts.append(tuple(e.input_ids[:first]))
    return tuple(prompts)


def save_centroid(model: nn.Module, out: str | Path, examples: Sequence[Example],
                  known: Features | None = None) -> Path | None:
    """Write ``routing.json`` into ``out`` from ``examples``' prompts; None when no
    example has a prompt. ``known`` lends features computed for the same prompts before
    and keeps these."""
    prompts = routing_prompts(examples)
    if not prompts:
        return None
    features = known.get(prompts) if known is not None else None
    if features is None:
        was_training = model.training
        model.eval()
        try:
            features = prompt_features(model, prompts)
        finally:
            model.train(was_training)
        if known is not None:
            known[prompts] = features
    return write_centroid(out, features)
