"""The materialisation cache behind the vLLM resolver: each store name becomes one plain
PEFT directory per content version, written atomically, checked before it is handed out;
prefix adapters, stale nodes and damaged entries are refused with the reason."""

import threading

import pytest
import torch

from loratree.adapters.files import read_adapter
from loratree.config import LoraConfig
from loratree.errors import AdapterNameError, AdapterNotFoundError
from loratree.tree import Tree
from loratree.vllm_plugin import (
    DamagedEntryError,
    MaterialisedCache,
    NotLoraError,
    StaleNodeError,
    UnsupportedFeatureError,
    cache_from_env,
    register,
    vllm_max_lora_rank,
)
from loratree.vllm_plugin import cache as cache_mod
from tests.vllm_plugin.common import adapter_dir, build_store


@pytest.fixture
def store(tmp_path):
    return build_store(tmp_path)


@pytest.fixture
def cache(store, tmp_path):
    return MaterialisedCache(store, tmp_path / "cache")


def test_a_node_is_composed_once_per_content_version(cache, store, tmp_path):
    first = cache.get("sup/fr/acme")
    assert cache.get("sup/fr/acme") == first and cache.built == 1
    assert MaterialisedCache(store, cache.root).get("sup/fr/acme") == first  # found on disk
    composed = Tree(store).composed("sup/fr/acme")
    written = read_adapter(first.path)
    assert written.weights.keys() == composed.weights.keys()
    for m, (a, b) in composed.weights.items():
        assert torch.equal(written.weights[m][0], a) and torch.equal(written.weights[m][1], b)
    assert first.rank == 2 + 3 + 1  # v_proj is adapted along the whole path
    # the same content added again: same entry; new weights: a new entry, the old one kept
    store.add("qv", store.path_of("qv"))
    before = cache.get("qv")
    store.add("qv", store.path_of("qv"))
    assert cache.get("qv") == before and cache.built == 2
    store.add("qv", adapter_dir(tmp_path, "qv", LoraConfig(rank=8, alpha=8), 99))
    after = cache.get("qv")
    assert after.key != before.key and after.rank == 8 and before.path.is_dir()


def test_entries_appear_whole_under_concurrent_first_requests(store, tmp_path):
    caches = [MaterialisedCache(store, tmp_path / "cache") for _ in range(4)]
    got = [None] * 4

    def resolve(i):
        got[i] = caches[i].get("sup/fr")

    threads = [threading.Thread(target=resolve, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({g.path for g in got}) == 1 and sum(c.built for c in caches) >= 1
    assert list((tmp_path / "cache").iterdir()) == [got[0].path]  # no temp dir left


def test_a_failed_build_leaves_nothing_behind(cache, monkeypatch):
    def boom(adapter, path):
        (path / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(cache_mod, "write_adapter_file", boom)
    with pytest.raises(OSError, match="disk full"):
        cache.get("qv")
    assert list(cache.root.iterdir()) == []
    monkeypatch.undo()
    assert cache.get("qv").path.is_dir()


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_a_damaged_entry_is_refused_until_deleted(cache, damage):
    entry = cache.get("sup/fr").path
    weights = entry / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x01
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(bytes(data[:-8]))
    elif damage == "delete":
        weights.unlink()
    else:
        (entry / cache_mod.MANIFEST).write_text("{")
    with pytest.raises(DamagedEntryError, match=r"damaged.*Delete the directory"):
        cache.get("sup/fr")
    for f in entry.iterdir():
        f.unlink()
    entry.rmdir()
    assert cache.get("sup/fr").path == entry  # rebuilt from the store


def test_a_prefix_adapter_is_refused_with_a_pointer_to_loratree_serve(cache):
    with pytest.raises(NotLoraError, match=r"prefix adapter; vLLM serves LoRA.*loratree serve"):
        cache.get("pre")
    assert list(cache.root.iterdir()) == []


def test_a_stale_node_is_refused_until_accepted(cache, store, tmp_path):
    cache.get("sup/fr/acme")
    store.add("sup/fr", adapter_dir(tmp_path, "sup/fr", LoraConfig(rank=3), 42, store))
    with pytest.raises(StaleNodeError, match=r"stale.*loratree tree accept sup/fr/acme"):
        cache.get("sup/fr/acme")
    Tree(store).accept("sup/fr/acme")
    assert cache.get("sup/fr/acme").rank == 2 + 3 + 1


def test_a_damaged_store_entry_is_refused(cache, store):
    (store.path_of("mlp") / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DamagedEntryError, match="'mlp'"):
        cache.get("mlp")
    assert cache.get("qv").path.is_dir()  # the others still serve


def test_unknown_and_malformed_names_are_not_found(cache):
    with pytest.raises(AdapterNotFoundError):
        cache.get("nope")
    with pytest.raises(AdapterNameError):
        cache.get("../etc")


def test_dora_is_refused_by_name(cache, store, tmp_path):
    store.add("dora", adapter_dir(tmp_path, "dora", LoraConfig(rank=2, use_dora=True), 3))
    with pytest.raises(UnsupportedFeatureError, match="DoRA"):
        cache.get("dora")


def test_max_lora_rank_is_one_of_vllms_choices():
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 320, 321)] == [1, 8, 8, 16, 320, 512]
    with pytest.raises(ValueError, match="512"):
        vllm_max_lora_rank(513)


def test_the_plugin_is_configured_by_the_environment(store, tmp_path):
    assert cache_from_env({}) is None
    register()  # without LORATREE_VLLM_STORE: nothing to do, and vLLM is never imported
    with pytest.raises(ValueError, match="not a loratree store"):
        cache_from_env({"LORATREE_VLLM_STORE": str(tmp_path / "missing")})
    assert not (tmp_path / "missing").exists()
    c = cache_from_env({"LORATREE_VLLM_STORE": str(store.root),
                        "LORATREE_VLLM_CACHE": str(tmp_path / "c")})
    assert c.root == tmp_path / "c" and c.get("qv").path.parent == tmp_path / "c"
