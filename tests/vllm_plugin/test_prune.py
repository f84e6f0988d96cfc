"""Pruning the vLLM cache: entries no store name holds and unused for the age go; current
entries, recent ones, and anything that is not an entry stay."""

import os
import time

import pytest

from loratree.cli.main import main
from loratree.config import LoraConfig
from loratree.vllm_plugin import MaterialisedCache, prune_cache
from loratree.vllm_plugin.cache import MANIFEST
from tests.vllm_plugin.common import adapter_dir, build_store

DAY = 86400.0


@pytest.fixture
def store(tmp_path):
    return build_store(tmp_path)


def age(entry, days):
    """Mark ``entry`` as last used ``days`` ago."""
    then = time.time() - days * DAY
    os.utime(entry / MANIFEST, (then, then))


def test_old_versions_go_after_the_age_and_current_ones_stay(store, tmp_path):
    cache = MaterialisedCache(store, tmp_path / "cache")
    old_qv = cache.get("qv")
    old_node = cache.get("sup/fr/acme")
    store.add("qv", adapter_dir(tmp_path, "qv", LoraConfig(rank=8, alpha=8), 99))
    store.add("sup", adapter_dir(tmp_path, "sup", LoraConfig(rank=2, alpha=4), 98))
    new_qv, mlp = cache.get("qv"), cache.get("mlp")
    (cache.root / "notes.txt").write_text("the operator's")
    (cache.root / "mine").mkdir()

    # replaced, but used within the age: a vLLM that resolved them may still reload them
    report = prune_cache(cache, DAY)
    assert report.removed == () and report.kept_recent == 2 and report.kept_current == 2

    for entry in (old_qv.path, old_node.path, new_qv.path, mlp.path):
        age(entry, 3)
    dry = prune_cache(cache, DAY, dry_run=True)
    assert sorted(dry.removed) == sorted([old_qv.path.name, old_node.path.name])
    assert old_qv.path.is_dir() and old_node.path.is_dir()  # a dry run deletes nothing

    report = prune_cache(cache, DAY)
    assert sorted(report.removed) == sorted(dry.removed) and report.freed_bytes > 0
    assert report.kept_current == 2 and report.kept_recent == 0  # current, however old
    assert not old_qv.path.exists() and not old_node.path.exists()
    assert new_qv.path.is_dir() and mlp.path.is_dir()
    assert (cache.root / "notes.txt").is_file() and (cache.root / "mine").is_dir()
    assert sorted(p.name for p in cache.root.iterdir() if p.name.startswith(".")) == []
    # "qv" as it was: a new entry on its next request, built from the store
    store.add("qv", tmp_path / "src-qv-1")  # build_store wrote it
    assert cache.get("qv").key == old_qv.key and cache.get("qv").path.is_dir()


def test_a_crashed_build_is_cleaned_after_the_age(store, tmp_path):
    cache = MaterialisedCache(store, tmp_path / "cache")
    key = cache.get("qv").key
    old = cache.root / f".{key}.x1y2.tmp"
    fresh = cache.root / f".{key}.z3w4.tmp"  # perhaps being written right now
    for d in (old, fresh):
        d.mkdir()
        (d / "adapter_config.json").write_text("{")
    then = time.time() - 2 * DAY
    os.utime(old, (then, then))
    assert prune_cache(cache, DAY).removed == (old.name,)
    assert fresh.is_dir() and not old.exists()


def test_the_cli_prunes_and_refuses_a_missing_store(store, tmp_path, capsys):
    cache = MaterialisedCache(store, tmp_path / "cache")
    old = cache.get("qv")
    store.add("qv", adapter_dir(tmp_path, "qv", LoraConfig(rank=8, alpha=8), 99))
    age(old.path, 10)
    args = ["vllm-cache", "prune", "--store", str(store.root), "--cache", str(cache.root)]
    assert main([*args, "--dry-run"]) == 0
    assert f"would delete {old.path.name}" in capsys.readouterr().out
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "deleted 1 entry" in out and not old.path.exists()
    assert main(["vllm-cache", "prune", "--store", str(tmp_path / "nope"),
                 "--cache", str(cache.root)]) == 2
    assert "is not a loratree store" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()
    with pytest.raises(ValueError, match="older_than_s"):
        prune_cache(cache, -1)
