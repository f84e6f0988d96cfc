"""The adapter cache: byte budget, LRU order, in-use and pinned entries, exact counters."""

import random

import pytest
import torch

from loratree import surgery
from loratree.adapters import AdapterStore, save_adapter
from loratree.config import LoraConfig, PrefixConfig
from loratree.errors import AdapterInUseError, AdapterNotFoundError, CacheFullError
from loratree.models.tiny import tiny_llama
from loratree.tree.cache import AdapterCache


# tiny_llama: hidden 32, kv width 16 (2 kv heads x 8); q,v LoRA of rank r holds
# 2 layers x [q: r*32 + 32*r, v: r*32 + 16*r] fp32 values
def _lora_bytes(r):
    return 4 * 2 * (r * 32 + 32 * r + r * 32 + 16 * r)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def _store(tmp_path, model, ranks):
    store = AdapterStore(tmp_path / "store")
    for i, r in enumerate(ranks):
        surgery.inject(model, LoraConfig(rank=r, targets=("q_proj", "v_proj")))
        store.save(f"a{i}", model, surgery.slot_count(model) - 1)
        surgery.unload(model)
    return store


def test_budget_holds_over_200_adapters_of_random_ranks(tmp_path, model):
    rng = random.Random(0)
    ranks = [rng.choice([1, 2, 4, 8]) for _ in range(200)]
    store = _store(tmp_path, model, ranks)
    budget = 5 * _lora_bytes(8)
    cache = AdapterCache(store, budget)
    for i, r in enumerate(ranks):
        adapter = cache.get(f"a{i}")
        assert adapter.nbytes == _lora_bytes(r) and adapter.rank == r
        stats = cache.stats
        assert stats.bytes <= budget
        assert stats.bytes == sum(_lora_bytes(ranks[int(n[1:])]) for n in cache.names())
    s = cache.stats
    assert (s.hits, s.misses) == (0, 200)
    assert s.evictions == 200 - s.entries
    assert s.loaded_bytes == sum(_lora_bytes(r) for r in ranks)


def test_eviction_is_least_recently_used_and_counters_are_exact(tmp_path, model):
    store = _store(tmp_path, model, [4] * 5)
    cache = AdapterCache(store, 3 * _lora_bytes(4))
    log = []
    for name in ["a0", "a1", "a2", "a0", "a3", "a1", "a4", "a0"]:
        cache.get(name)
        log.append(cache.names())
    assert log[3] == ["a1", "a2", "a0"]
    assert log[4] == ["a2", "a0", "a3"]          # a1 was least recently used
    assert log[5] == ["a0", "a3", "a1"]          # a2 next
    assert log[6] == ["a3", "a1", "a4"]          # then a0
    assert log[7] == ["a1", "a4", "a0"]
    s = cache.stats
    assert (s.hits, s.misses, s.evictions, s.entries) == (1, 7, 4, 3)


def test_in_use_is_never_evicted_and_pinning_past_capacity_raises(tmp_path, model):
    store = _store(tmp_path, model, [4] * 4)
    cache = AdapterCache(store, 2 * _lora_bytes(4))
    with cache.use("a0"):
        cache.get("a1")
        cache.get("a2")                            # evicts a1, not the older a0
        assert cache.names() == ["a0", "a2"]
        with pytest.raises(AdapterInUseError):
            cache.evict("a0")
        cache.pin("a2")
        with pytest.raises(CacheFullError, match="pinned and in-use"):
            cache.get("a3")
        assert cache.names() == ["a0", "a2"]       # a failed load evicts nothing
    cache.get("a3")                                # a0 is free again: it goes
    assert cache.names() == ["a2", "a3"]
    cache.pin("a3")                                # a2 and a3 pinned: the budget is full
    with pytest.raises(CacheFullError):
        cache.pin("a0")
    cache.unpin("a2")
    with pytest.raises(RuntimeError, match="not pinned"):
        cache.unpin("a2")
    with pytest.raises(AdapterNotFoundError):
        cache.get("nope")


def test_a_replaced_adapter_reloads_and_prefetch_warms(tmp_path, model):
    store = _store(tmp_path, model, [2, 4])
    cache = AdapterCache(store, 10 * _lora_bytes(8))
    assert cache.get("a0").rank == 2
    store.add("a0", store.path_of("a1"))
    assert cache.get("a0").rank == 4 and cache.stats.misses == 2
    cache.prefetch("a1").result()
    cache.get("a1")
    assert cache.stats.hits == 1
    surgery.add_prefix(model, PrefixConfig(n_virtual=3, init="random"), trainable=False)
    save_adapter(model, tmp_path / "p", surgery.slot_count(model) - 1)
    surgery.unload(model)
    store.add("p", tmp_path / "p")
    p = cache.get("p")
    assert p.kind == "prefix" and p.nbytes == 3 * 2 * 2 * 16 * 4
    assert torch.isfinite(p.prefix.vectors).all()
    cache.close()
