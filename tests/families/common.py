"""What the family tests share: each family's tiny model with weights scaled so that its
greedy output depends visibly on the adapter, a store of adapters of every kind for it, and
PEFT's solo greedy output as the reference.

PEFT 0.21.2's prefix-tuning ``generate`` drops the prefix under transformers 5.23+ (its
forward keeps it), so the reference decodes by full forwards, one per new token, through
PEFT's forward: no cache of ours or theirs is involved.
"""

from __future__ import annotations

import functools
from pathlib import Path

import peft
import torch

from loratree import surgery
from loratree.adapters import AdapterStore
from loratree.config import LoraConfig, PrefixConfig
from loratree.models.families import tiny_family
from loratree.serve.slot_table import BASE
from tests.conftest import randomize_slot

ADAPTERS = {
    "qv-r2": LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj")),
    "all-r4": LoraConfig(rank=4, alpha=8, targets=("all-linear",)),
}
"""Two LoRA adapters of two ranks (q,v where the family has them, else all-linear)."""


def scaled(family: str) -> torch.nn.Module:
    """The family's tiny model with its matrices x3, so adapters change greedy tokens."""
    model = tiny_family(family)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


def lora_config(family: str, name: str) -> LoraConfig:
    """Adapter ``name``'s config for ``family``: all-linear where it has no q_proj."""
    cfg = ADAPTERS[name]
    if "q_proj" in cfg.targets and "q_proj" not in _leaf_names(family):
        return LoraConfig(rank=cfg.rank, alpha=cfg.alpha, targets=("all-linear",))
    return cfg


@functools.cache
def _leaf_names(family: str) -> frozenset[str]:
    return frozenset(n.rsplit(".", 1)[-1] for n, _ in tiny_family(family).named_modules())


def family_store(family: str, root: Path) -> AdapterStore:
    """A store with qv-r2, all-r4 (random non-zero factors) and prefix (3 virtual tokens)."""
    store = AdapterStore(root)
    for i, name in enumerate(ADAPTERS):
        model = scaled(family)
        surgery.inject(model, lora_config(family, name))
        randomize_slot(model, 0, std=0.3, seed=10 + i)
        store.save(name, model, 0)
    model = scaled(family)
    geo = surgery.geometry(model)
    g = torch.Generator().manual_seed(5)
    surgery.add_prefix(model, PrefixConfig(n_virtual=3),
                       vectors=torch.randn(3, geo.width, generator=g))
    store.save("prefix", model, 0)
    return store


class PeftReference:
    """PEFT's solo greedy tokens and logits per (adapter, prompt, n), memoised."""

    def __init__(self, family: str, store: AdapterStore) -> None:
        self.family, self.store = family, store
        self._models: dict[str, torch.nn.Module] = {}
        self._seen: dict[tuple, tuple[list[int], list[torch.Tensor]]] = {}

    def model(self, name: str) -> torch.nn.Module:
        if name not in self._models:
            base = scaled(self.family)
            self._models[name] = (base if name == BASE else peft.PeftModel.from_pretrained(
                base, str(self.store.path_of(name))).eval())
        return self._models[name]

    def greedy(self, name: str, prompt: list[int], n: int
               ) -> tuple[list[int], list[torch.Tensor]]:
        key = (name, tuple(prompt), n)
        if key not in self._seen:
            model, ids, logits = self.model(name), list(prompt), []
            with torch.no_grad():
                for _ in range(n):
                    out = model(input_ids=torch.tensor([ids])).logits[0, -1]
                    logits.append(out)
                    ids.append(int(out.argmax()))
            self._seen[key] = (ids[len(prompt):], logits)
        return self._seen[key]
