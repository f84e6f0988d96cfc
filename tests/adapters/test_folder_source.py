"""Plain folders of PEFT adapters as a source: names by relative path, changes seen by file
identity, reads that never return half a file, and the store's stray directories named."""

import logging
import os
import shutil
import threading
import time

import pytest
import torch

from loratree import surgery
from loratree.adapters import AdapterStore, save_adapter
from loratree.adapters.folder_source import FolderSource
from loratree.adapters.source import Sources
from loratree.config import LoraConfig
from loratree.errors import (
    AdapterConfigError,
    AdapterFileError,
    AdapterNotFoundError,
    CorruptFileError,
)
from loratree.models.tiny import tiny_llama
from loratree.tree.store_source import StoreSource, serving_sources
from tests.conftest import randomize_slot, rewrite_in_place

QV = LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj"))
WEIGHTS = "adapter_model.safetensors"


def _adapter(path, seed):
    model = tiny_llama(vocab=64)
    surgery.inject(model, QV)
    randomize_slot(model, 0, std=0.3, seed=seed)
    return save_adapter(model, path, 0)


def _a(read):
    return {m: a.clone() for m, (a, _) in read.lora.weights.items()}


def test_names_are_relative_paths_at_any_depth(tmp_path):
    for rel in ("top", "support/fr", "support/fr/acme", ".hidden/x"):
        _adapter(tmp_path / rel, 1)
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    (tmp_path / "bad name").mkdir()
    shutil.copytree(tmp_path / "top", tmp_path / "bad name" / "x")
    source = FolderSource(tmp_path)
    assert [i.name for i in source.list()] == ["support/fr", "support/fr/acme", "top"]
    assert "support/fr" in source and "support" not in source and ".hidden/x" not in source
    assert source.info("support/fr").kind == "lora" and source.info("top").rank == 2
    with pytest.raises(AdapterNotFoundError):
        source.read("support")
    _adapter(tmp_path / "later" / "one", 2)  # appears without a rescan
    assert "later/one" in source and source.read("later/one").lora is not None


def test_links_on_the_way_and_dot_dot_are_refused(tmp_path):
    outside = tmp_path / "outside"
    _adapter(outside / "x", 1)
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside, root / "link")
    source = FolderSource(root)
    assert "link/x" not in source and "../outside/x" not in source
    assert source.list() == []


def test_a_rewrite_is_a_new_version_and_bad_files_name_the_problem(tmp_path):
    path = _adapter(tmp_path / "x", 1)
    source = FolderSource(tmp_path, tries=2, pause_s=0.001)
    time.sleep(0.03)  # past the settle time
    first = source.read("x")
    assert first.version == source.version_of("x")
    data = (path / WEIGHTS).read_bytes()
    _adapter(tmp_path / "other", 2)
    (path / WEIGHTS).write_bytes((tmp_path / "other" / WEIGHTS).read_bytes())
    assert source.version_of("x") != first.version
    time.sleep(0.03)
    assert not torch.equal(next(iter(_a(source.read("x")).values())),
                           next(iter(_a(first).values())))
    (path / WEIGHTS).write_bytes(data[: len(data) - 10])
    time.sleep(0.03)
    with pytest.raises(CorruptFileError, match="truncated"):
        source.read("x")
    (path / WEIGHTS).write_bytes(data)
    (path / "adapter_config.json").write_text("{oops")
    time.sleep(0.03)
    with pytest.raises(AdapterConfigError, match="not valid JSON"):
        source.read("x")


def test_what_was_read_does_not_change_when_the_file_is_rewritten_in_place(tmp_path):
    """The bytes are copied, never mapped: a later in-place rewrite (even one that
    truncates) cannot reach an adapter already read."""
    path = _adapter(tmp_path / "x", 1)
    time.sleep(0.03)
    read = FolderSource(tmp_path).read("x")
    before = _a(read)
    size = (path / WEIGHTS).stat().st_size
    with open(path / WEIGHTS, "r+b") as f:
        f.write(b"\xff" * size)
    for module, (a, _) in read.lora.weights.items():
        assert torch.equal(a, before[module])
    with open(path / WEIGHTS, "wb"):
        pass
    assert all(torch.isfinite(a).all() for a, _ in read.lora.weights.values())


@pytest.mark.parametrize("mode", ["wb", "r+b"])
def test_reads_under_a_writer_are_whole_versions_or_clear_errors(tmp_path, mode):
    """A writer rewrites the weights in place, A and B in turn, in chunks with pauses
    (``wb`` truncates first; ``r+b`` overwrites at the same size, so a careless reader
    would see a whole-sized mix): every read is exactly A or B, or an AdapterFileError;
    most succeed."""
    path = _adapter(tmp_path / "x", 1)
    _adapter(tmp_path / "b", 2)
    blobs = [(path / WEIGHTS).read_bytes(), (tmp_path / "b" / WEIGHTS).read_bytes()]
    assert len(blobs[0]) == len(blobs[1])
    source = FolderSource(tmp_path)
    time.sleep(0.03)
    want = [_a(source.read("x")), _a(source.read("b"))]
    stop = threading.Event()

    def writer():
        rewrite_in_place(path / WEIGHTS, blobs, stop, mode=mode, pause=0.05)

    thread = threading.Thread(target=writer)
    thread.start()
    ok = errors = 0
    seen = set()
    try:
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            try:
                got = _a(source.read("x"))
            except AdapterFileError:
                errors += 1
                continue
            match = [i for i, w in enumerate(want)
                     if all(torch.equal(got[m], w[m]) for m in w)]
            assert match, "a read returned neither version"
            seen.add(match[0])
            ok += 1
    finally:
        stop.set()
        thread.join()
    assert ok > errors and seen == {0, 1}


def test_store_then_folders_and_strays_in_the_store_root_are_named(tmp_path, caplog):
    store = AdapterStore(tmp_path / "store")
    store.add("shared", _adapter(tmp_path / "s1", 1))
    folder = tmp_path / "folder"
    _adapter(folder / "shared", 2)
    _adapter(folder / "only", 3)
    stray = _adapter(store.root / "copied" / "mine", 4)
    with caplog.at_level(logging.WARNING):
        source = serving_sources(store, (folder,))
    text = caplog.text
    assert f"loratree store --store {store.root} add copied/mine {stray}" in text
    assert "'shared'" in text and "the first serves it" in text
    assert isinstance(source, Sources) and isinstance(source.sources[0], StoreSource)
    assert source.read("shared").path.parent == store.objects  # the store wins
    assert source.read("only").path == folder.resolve() / "only"
    assert "copied/mine" not in source
    assert [i.name for i in source.list()] == ["only", "shared"]
    store.add("copied/mine", stray)  # the command the log gives
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        serving_sources(store)
    assert "copied/mine" not in caplog.text and "copied/mine" in store
