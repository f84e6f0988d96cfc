"""The adapter store: hostile names refused without touching files outside, atomic replace,
metadata for both adapter kinds."""

import builtins
import os
import threading

import pytest
import torch

from loratree import surgery
from loratree.adapters import AdapterStore, load_adapter, save_adapter
from loratree.config import LoraConfig, PrefixConfig
from loratree.errors import (
    AdapterFileError,
    AdapterNameError,
    AdapterNotFoundError,
    DamagedAdapterError,
)
from loratree.models.tiny import tiny_llama


@pytest.fixture
def lora_dir(tmp_path):
    model = tiny_llama()
    surgery.inject(model, LoraConfig(rank=4, targets=("q_proj", "v_proj")))
    return save_adapter(model, tmp_path / "src-lora")


@pytest.fixture
def prefix_dir(tmp_path):
    model = tiny_llama()
    surgery.add_prefix(model, PrefixConfig(n_virtual=3, init="random"))
    return save_adapter(model, tmp_path / "src-prefix")


HOSTILE = [
    "/etc/passwd", "../outside", "a/../../outside", "a/./b", "", "x" * 201, "a\\..\\b",
    "%2e%2e/x", "..%2fx", "a\x00b", ".hidden", "a//b", "a/", " spaces ", "ümlaut",
]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_are_refused_before_any_file_is_opened(tmp_path, lora_dir, name,
                                                               monkeypatch):
    store = AdapterStore(tmp_path / "store")
    opened = []
    real_open = builtins.open

    def spy(path, *a, **kw):
        opened.append(str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", spy)
    for call in (store.path_of, store.info, lambda n: store.add(n, lora_dir), store.remove):
        with pytest.raises(AdapterNameError):
            call(name)
    assert opened == []
    assert name not in store


def test_an_escaping_symlink_is_refused(tmp_path, lora_dir):
    store = AdapterStore(tmp_path / "store")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(lora_dir, store.root / "planted")          # a link in place of a name's dir
    (store.root / "fake").mkdir()
    os.symlink(lora_dir, store.root / "fake" / "@")       # a version outside .objects
    os.symlink(outside, store.root / "linkdir")            # a directory leading out
    with pytest.raises(AdapterNameError, match="link"):
        store.path_of("planted")
    with pytest.raises(DamagedAdapterError, match=r"'fake'.*outside"):  # an entry, refused
        store.path_of("fake")
    with pytest.raises(AdapterNameError, match="linkdir"):
        store.add("linkdir/x", lora_dir)
    assert list(outside.iterdir()) == []
    assert [i.name for i in store.list()] == []


def test_add_list_info_remove(tmp_path, lora_dir, prefix_dir):
    store = AdapterStore(tmp_path / "store")
    a = store.add("support/en", lora_dir)
    b = store.add("pirate", prefix_dir)
    assert (a.kind, a.rank, set(a.targets)) == ("lora", 4, {"q_proj", "v_proj"})
    assert (b.kind, b.rank) == ("prefix", 3)
    assert a.size == sum(f.stat().st_size for f in lora_dir.iterdir())
    assert [i.name for i in store.list()] == ["pirate", "support/en"]
    model = tiny_llama()
    assert load_adapter(model, store.path_of("support/en")) == 0
    assert load_adapter(model, store.path_of("pirate")) == 1
    store.remove("pirate")
    with pytest.raises(AdapterNotFoundError, match="pirate"):
        store.path_of("pirate")
    store.collect(grace_s=0)
    assert [p.name for p in store.objects.iterdir()] == [a.path.name]


def test_bad_adapter_is_refused_before_it_is_visible(tmp_path, lora_dir):
    store = AdapterStore(tmp_path / "store")
    store.add("a", lora_dir)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFileError):
        store.add("a", bad)
    assert store.info("a").rank == 4  # the old version is untouched
    assert len(list(store.objects.iterdir())) == 1


def test_replacing_never_exposes_a_partial_adapter(tmp_path, lora_dir, prefix_dir):
    store = AdapterStore(tmp_path / "store")
    store.add("x", lora_dir)
    stop, seen, errors = threading.Event(), set(), []

    def reader():
        while not stop.is_set():
            try:
                path = store.path_of("x")
                files = sorted(p.name for p in path.iterdir())
                if files != ["adapter_config.json", "adapter_model.safetensors",
                             "loratree_manifest.json"]:
                    errors.append(files)
                seen.add(store.info("x").kind)
            except (AdapterNotFoundError, FileNotFoundError) as e:
                errors.append(repr(e))

    t = threading.Thread(target=reader)
    t.start()
    for i in range(30):
        store.add("x", prefix_dir if i % 2 else lora_dir)
    stop.set()
    t.join()
    assert not errors, errors[:3]
    assert seen == {"lora", "prefix"}
    assert len(list(store.objects.iterdir())) == 31  # replaced versions wait out the grace
    assert store.collect(grace_s=0) == 30
    assert store.info("x").kind == "prefix"


def test_save_from_a_model(tmp_path):
    store = AdapterStore(tmp_path / "store")
    model = tiny_llama()
    surgery.inject(model, LoraConfig(rank=2))
    with torch.no_grad():
        for layer in surgery.lora_layers(model).values():
            layer.lora_b[0].fill_(0.1)
    info = store.save("m/one", model, 0)
    assert info.kind == "lora" and info.rank == 2
    other = tiny_llama()
    load_adapter(other, store.path_of("m/one"))
    ids = torch.randint(0, 100, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(other(ids).logits, model(ids).logits)


def test_a_damaged_entry_is_named_and_breaks_nothing_else(tmp_path, lora_dir, prefix_dir):
    """An entry whose config was replaced after `add` (r not a number) is reported with
    the command that fixes it; listing, adding and collecting still work, and its files
    are kept (nothing is lost)."""
    import json

    from loratree.adapters.store import DamagedEntry

    store = AdapterStore(tmp_path / "store")
    store.add("good", lora_dir)
    bad = store.add("bad", lora_dir)
    cfg = bad.path / "adapter_config.json"
    raw = json.loads(cfg.read_text())
    cfg.chmod(0o644)
    cfg.write_text(json.dumps({**raw, "r": "eight"}))
    infos, damaged = store.scan()
    assert [i.name for i in infos] == ["good"]
    assert [d.name for d in damaged] == ["bad"]
    assert "'eight'" in damaged[0].problem and "adapter_config.json" in damaged[0].problem
    assert damaged[0].fix.startswith("replace it with `loratree store add bad DIR`")
    assert isinstance(damaged[0], DamagedEntry)
    assert [i.name for i in store.list()] == ["good"]
    store.add("prefix", prefix_dir)          # adding still works
    assert store.collect(grace_s=0) == 0     # the damaged entry's version is kept
    assert cfg.is_file()
    store.add("bad", lora_dir)               # the fix the message names
    assert store.scan()[1] == []
    assert [i.name for i in store.list()] == ["bad", "good", "prefix"]
