"""A small store for the vLLM plugin's tests: LoRA roots of different ranks and targets,
a depth-3 tree path, and a prefix adapter, all on the tiny Llama of tests/serve
(``tests.serve.common.adapter_dir`` writes each LoRA)."""

import torch

from loratree import surgery
from loratree.adapters import AdapterStore
from loratree.config import LoraConfig, PrefixConfig
from tests.serve.common import adapter_dir, tiny_model

LORAS = {
    "qv": LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj")),
    "mlp": LoraConfig(rank=5, alpha=5, targets=("down_proj", "up_proj"), use_rslora=True),
    "sup": LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj")),
    "sup/fr": LoraConfig(rank=3, alpha=5, targets=("all-linear",)),
    "sup/fr/acme": LoraConfig(rank=1, alpha=2, targets=("v_proj", "down_proj")),
}


def build_store(tmp):
    """The store above, with a prefix adapter named ``pre``."""
    store = AdapterStore(tmp / "store")
    for seed, (name, config) in enumerate(LORAS.items(), start=1):
        store.add(name, adapter_dir(tmp, name, config, seed, store))
    model = tiny_model()
    geo = surgery.geometry(model)
    g = torch.Generator().manual_seed(5)
    surgery.add_prefix(model, PrefixConfig(n_virtual=3),
                       vectors=torch.randn(3, geo.width, generator=g))
    store.save("pre", model, 0)
    return store
