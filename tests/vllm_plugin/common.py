"""A small store for the vLLM plugin's tests: LoRA roots of different ranks and targets,
a depth-3 tree path, and a prefix adapter, all on the tiny Llama of tests/serve."""

import torch

from loratree import surgery
from loratree.adapters import AdapterStore, save_adapter
from loratree.adapters.node_files import write_record
from loratree.config import LoraConfig, PrefixConfig
from loratree.tree import nodes
from tests.conftest import randomize_slot
from tests.serve.common import tiny_model

LORAS = {
    "qv": LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj")),
    "mlp": LoraConfig(rank=5, alpha=5, targets=("down_proj", "up_proj"), use_rslora=True),
    "sup": LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj")),
    "sup/fr": LoraConfig(rank=3, alpha=5, targets=("all-linear",)),
    "sup/fr/acme": LoraConfig(rank=1, alpha=2, targets=("v_proj", "down_proj")),
}


def adapter_dir(tmp, name, config, seed, store=None):
    """A PEFT directory of a random LoRA adapter (a tree record when ``name`` is a path)."""
    model = tiny_model()
    surgery.inject(model, config)
    randomize_slot(model, 0, std=0.3, seed=seed)
    d = save_adapter(model, tmp / f"src-{name.replace('/', '_')}-{seed}")
    if "/" in name:
        write_record(d, nodes.record_for(store, name.rsplit("/", 1)[0]))
    return d


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
