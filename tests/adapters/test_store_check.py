"""A store that survives damage at rest: every damaged entry is named with every problem,
and listing, adding, removing and loading the others keep working."""

import json

import peft
import pytest
import torch

from loratree import surgery
from loratree.adapters import AdapterStore, load_adapter, save_adapter
from loratree.adapters.store_check import MANIFEST_NAME
from loratree.adapters.store_check import ProblemKind as K
from loratree.cli.main import main
from loratree.config import LoraConfig
from loratree.errors import AdapterNotFoundError, DamagedAdapterError
from loratree.models.tiny import tiny_llama
from tests.adapters.damage import EXPECTED, OLD, SAME_SIZE, damage_all
from tests.conftest import randomize_slot

GOOD = ("good/a", "good/b")


def _adapter_dir(path, rank, seed=0):
    model = tiny_llama()
    surgery.inject(model, LoraConfig(rank=rank, targets=("q_proj", "v_proj")))
    randomize_slot(model, 0, seed=seed)
    return save_adapter(model, path)


@pytest.fixture
def dirs(tmp_path):
    return _adapter_dir(tmp_path / "r4", 4), _adapter_dir(tmp_path / "r8", 8, seed=1)


@pytest.fixture
def store(tmp_path, dirs):
    """Good adapters beside one entry per kind of damage, and one from before manifests."""
    store = AdapterStore(tmp_path / "store")
    for name in GOOD:
        store.add(name, dirs[0])
    (tmp_path / "outside").mkdir()
    damage_all(store, dirs[0], dirs[1], tmp_path / "outside")
    return store


def _kinds(problems):
    found = {}
    for p in problems:
        found.setdefault(p.name, set()).add(p.kind)
    return found


def test_the_manifest_records_each_file_and_peft_still_loads_the_version(tmp_path, dirs):
    store = AdapterStore(tmp_path / "store")
    info = store.add("a", dirs[0])
    manifest = json.loads((info.path / MANIFEST_NAME).read_text())["files"]
    assert set(manifest) == {"adapter_config.json", "adapter_model.safetensors"}
    assert all(len(r["sha256"]) == 64 and r["size"] > 0 for r in manifest.values())
    assert store.check() == []
    base = tiny_llama()
    theirs = peft.PeftModel.from_pretrained(base, str(info.path)).eval()
    ours = tiny_llama()
    load_adapter(ours, info.path)
    ids = torch.randint(0, 100, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits)


def test_check_names_every_problem_of_every_entry(store):
    found = _kinds(store.check())
    assert found == {**EXPECTED, OLD: {K.NO_RECORDED_HASH}}
    for p in store.check():
        assert p.damaged == (p.name != OLD)
        assert p.name in p.fix
    assert store.check("good/a") == []
    assert [p.kind for p in store.check(OLD)] == [K.NO_RECORDED_HASH]
    with pytest.raises(AdapterNotFoundError):
        store.check("nope")


def test_scan_is_cheap_and_names_what_it_can(store, monkeypatch):
    import loratree.adapters.store_check as sc

    monkeypatch.setattr(sc, "_sha256", lambda _: pytest.fail("scan hashed a file"))
    infos, damaged = store.scan()
    assert [i.name for i in infos] == sorted([*GOOD, OLD, *SAME_SIZE])
    assert {d.name: {p.kind for p in d.problems} for d in damaged} == {
        n: kinds - {K.HASH_MISMATCH, K.WEIGHTS_NON_FINITE} for n, kinds in EXPECTED.items()
        if n not in SAME_SIZE}
    assert all(d.fix.startswith(f"replace it with `loratree store add {d.name} DIR`")
               for d in damaged)


def test_every_damaged_entry_refuses_to_load_and_the_others_load(store):
    for name in EXPECTED:
        with pytest.raises(DamagedAdapterError, match=f"'{name}' is damaged"):
            store.checked_path(name)
    for name in (*GOOD, OLD):
        assert load_adapter(tiny_llama(), store.checked_path(name)) == 0


def test_add_and_remove_work_with_damage_present(store, dirs):
    store.add("new", dirs[1])
    assert store.info("new").rank == 8
    for name in list(EXPECTED)[::2]:          # the fix: re-add a good copy
        store.add(name, dirs[0])
        assert store.check(name) == []
    for name in list(EXPECTED)[1::2]:         # or remove it
        store.remove(name)
        assert name not in store
    store.remove("good/b")
    store.add(OLD, store.path_of(OLD))        # re-adding in place records a hash
    assert store.check() == []
    assert store.collect(grace_s=0) > 0
    assert [i.name for i in store.list()] == sorted(
        ["good/a", "new", OLD, *list(EXPECTED)[::2]])


def test_the_cli_lists_checks_adds_and_removes(store, dirs, capsys):
    root = ["store", "--store", str(store.root)]
    assert main([*root, "list"]) == 0
    out = capsys.readouterr().out
    for name in set(EXPECTED) - SAME_SIZE:
        assert f"{name}" in out and f"loratree store add {name} DIR" in out
    assert f"{len(EXPECTED) - len(SAME_SIZE)} damaged" in out
    assert main([*root, "check"]) == 1
    out = capsys.readouterr().out
    for name, kinds in EXPECTED.items():
        lines = [line for line in out.splitlines() if line.startswith(f"DAMAGED {name}: ")]
        assert {line.split(": ")[2] for line in lines} == {str(k) for k in kinds}, name
    assert f"warning {OLD}: {MANIFEST_NAME}: no_recorded_hash" in out
    assert "re-add it to record one" in out and "fix: replace it with" in out
    assert main([*root, "check", "--json"]) == 1
    listed = json.loads(capsys.readouterr().out)
    assert {p["name"] for p in listed if p["damaged"]} == set(EXPECTED)
    assert main([*root, "check", "good/a"]) == 0
    assert main([*root, "check", OLD]) == 0    # a warning is not damage
    capsys.readouterr()
    assert main([*root, "add", "d-truncated", str(dirs[0])]) == 0
    assert main([*root, "remove", "d-planted"]) == 0
    assert main([*root, "remove", "good/b"]) == 0
    assert main([*root, "check", "d-truncated"]) == 0
    capsys.readouterr()
    assert main([*root, "list"]) == 0
    out = capsys.readouterr().out
    assert "d-truncated " in out and "d-planted" not in out


def test_an_unreadable_version_is_one_problem_not_a_crash(store, monkeypatch):
    import loratree.adapters.store_check as sc

    version, real = str(store.path_of("good/b")), sc.os.scandir

    def scandir(path):
        if str(path) == version:
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(sc.os, "scandir", scandir)
    assert [(p.name, p.kind) for p in store.check("good/b")] == [("good/b", K.UNREADABLE)]
    assert "good/b" in {d.name for d in store.scan()[1]}
    with pytest.raises(DamagedAdapterError, match="Permission denied"):
        store.checked_path("good/b")


def test_a_damaged_entry_below_a_name_holds_its_removal_until_it_goes(tmp_path, dirs):
    """Whether a damaged sub-entry was a tree child cannot be read, so it counts as one."""
    import shutil

    from loratree.errors import AdapterInUseError

    store = AdapterStore(tmp_path / "store")
    store.add("p", dirs[0])
    shutil.rmtree(store.add("p/c", dirs[0]).path)
    with pytest.raises(AdapterInUseError, match=r"p/c \(damaged\)"):
        store.remove("p")
    store.remove("p/c")
    store.remove("p")
    assert store.names() == []
