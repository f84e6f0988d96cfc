"""The models under test: one base model and adapted deep copies for loratree and PEFT.

Both sides get the same LoRA weights: ours are filled from a seeded generator (A random,
B small but nonzero, so merged and unmerged forwards really differ from the base) and then
copied into PEFT's modules by name.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import peft
import torch
from torch import nn

from loratree import surgery
from loratree.config import LoraConfig
from loratree.models import load_base

__all__ = [
    "ALL_R16",
    "QV_R8",
    "AdapterSpec",
    "add_ours_slot",
    "add_peft_adapter",
    "load_model",
    "ours_model",
    "peft_model",
    "random_ids",
]

B_STD = 0.01
"""Std of B's entries: a visible but small change to the model's outputs."""
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter shape, spelled for both libraries; alpha = 2 r on both sides."""

    label: str
    rank: int
    targets: tuple[str, ...]
    peft_targets: list[str] | str

    def ours(self) -> LoraConfig:
        return LoraConfig(rank=self.rank, alpha=2.0 * self.rank, targets=self.targets)

    def peft(self) -> peft.LoraConfig:
        return peft.LoraConfig(
            r=self.rank, lora_alpha=2 * self.rank, target_modules=self.peft_targets
        )


QV_R8 = AdapterSpec("q,v r=8", 8, ("q_proj", "v_proj"), ["q_proj", "v_proj"])
ALL_R16 = AdapterSpec("all-linear r=16", 16, ("all-linear",), "all-linear")


def load_model() -> nn.Module:
    """The embedded SmolLM2-135M-Instruct in float32, in eval mode."""
    model, _ = load_base(None)
    return model.eval()


def random_ids(model: nn.Module, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """Random token ids ``(batch, seq)`` over the model's vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)


def ours_model(base: nn.Module, spec: AdapterSpec, seed: int) -> nn.Module:
    """A deep copy of ``base`` with our adapter in slot 0, filled with seeded weights."""
    model = copy.deepcopy(base)
    add_ours_slot(model, spec, seed)
    return model


def add_ours_slot(model: nn.Module, spec: AdapterSpec, seed: int) -> int:
    """Inject one more slot of ``spec`` and fill it; returns the slot."""
    slot = surgery.inject(model, spec.ours(), trainable=False).slot
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in surgery.lora_layers(model).values():
            a, b = layer.lora_a[slot], layer.lora_b[slot]
            if a.numel() == 0:
                continue
            a.copy_(torch.randn(a.shape, generator=g) / a.shape[1] ** 0.5)
            b.copy_(torch.randn(b.shape, generator=g) * B_STD)
    return slot


def peft_model(
    base: nn.Module, spec: AdapterSpec, ours: nn.Module, *, copy_base: bool = True
) -> peft.PeftModel:
    """``base`` (a deep copy unless ``copy_base`` is False) wrapped by PEFT, holding slot 0
    of ``ours`` as "default"."""
    model = peft.get_peft_model(copy.deepcopy(base) if copy_base else base, spec.peft())
    model.eval()
    _copy_weights(ours, 0, model, "default")
    return model


def add_peft_adapter(
    model: peft.PeftModel, spec: AdapterSpec, name: str, ours: nn.Module, slot: int
) -> None:
    """Add adapter ``name`` to a PEFT model with the weights of ``slot`` of ``ours``."""
    model.add_adapter(name, spec.peft())
    model.eval()
    _copy_weights(ours, slot, model, name)


@torch.no_grad()
def _copy_weights(ours: nn.Module, slot: int, theirs: nn.Module, name: str) -> None:
    layers = {n: m for n, m in surgery.lora_layers(ours).items() if m.specs[slot].rank > 0}
    peft_layers = {
        n.removeprefix(PEFT_PREFIX): m
        for n, m in theirs.named_modules()
        if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and name in m.lora_A
    }
    if set(layers) != set(peft_layers):
        only_ours = sorted(set(layers) - set(peft_layers))
        only_peft = sorted(set(peft_layers) - set(layers))
        raise RuntimeError(f"targets differ: only ours {only_ours}, only PEFT {only_peft}")
    for n, layer in layers.items():
        peft_layers[n].lora_A[name].weight.copy_(layer.lora_a[slot])
        peft_layers[n].lora_B[name].weight.copy_(layer.lora_b[slot])
