"""Fixtures for the HTTP tests: a store of many adapters and a real server on 127.0.0.1."""

from contextlib import contextmanager

import pytest
import torch

from loratree import surgery
from loratree.adapters import AdapterStore
from loratree.config import LoraConfig, PrefixConfig
from loratree.models.tiny import tiny_tokenizer
from loratree.serve import Engine
from loratree.serve.http import ServerConfig, create_app
from loratree.serve.server import serve_in_thread
from loratree.serve.slot_table import SlotTable
from loratree.tree.cache import AdapterCache
from tests.conftest import randomize_slot
from tests.serve.common import VOCAB, tiny_model

N_ADAPTERS = 20
QV = LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj"))


def lora_adapter(seed, config=QV):
    model = tiny_model()
    surgery.inject(model, config)
    randomize_slot(model, 0, std=0.3, seed=seed)
    return model


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """A store with a00..a19 (q,v r=2), all-r4 (all-linear r=4) and prefix (3 tokens)."""
    store = AdapterStore(tmp_path_factory.mktemp("store"))
    for i in range(N_ADAPTERS):
        store.save(f"a{i:02d}", lora_adapter(100 + i), 0)
    store.save("all-r4", lora_adapter(7, LoraConfig(rank=4, alpha=8,
                                                    targets=("all-linear",))), 0)
    model = tiny_model()
    geo = surgery.geometry(model)
    g = torch.Generator().manual_seed(5)
    surgery.add_prefix(model, PrefixConfig(n_virtual=3),
                       vectors=torch.randn(3, geo.width, generator=g))
    store.save("prefix", model, 0)
    return store


def make_engine(store, cache_adapters=4, slots=4, max_batch=8):
    model = tiny_model()
    size = max(i.size for i in store.list())
    table = SlotTable(model, AdapterCache(store, cache_adapters * size), n_slots=slots,
                      max_rank=8)
    return Engine(model, tiny_tokenizer(VOCAB), table, max_batch=max_batch)


@contextmanager
def live(store, engine=None, **config):
    """A real uvicorn server over a fresh engine; yields (base URL, app state)."""
    engine = engine or make_engine(store)
    app = create_app(engine, ServerConfig(base_name="tiny", **config))
    with serve_in_thread(app) as url:
        yield url, app.state.loratree
