"""fsio.atomic_dir: a directory appears whole or not at all, and a failure leaves no trace."""

from __future__ import annotations

import os

import pytest

from loratree.fsio import atomic_dir


def test_a_new_directory_appears_whole_and_its_temp_is_gone(tmp_path):
    out = tmp_path / "sub" / "model"
    with atomic_dir(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".model.")
        assert tmp.name.endswith(".tmp") and not out.exists()  # nothing visible yet
        (tmp / "a.txt").write_text("a")
        (tmp / "d").mkdir()
        (tmp / "d" / "b.txt").write_text("b")
    assert (out / "a.txt").read_text() == "a" and (out / "d" / "b.txt").read_text() == "b"
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]


def test_an_existing_directory_is_replaced_only_when_the_new_one_is_complete(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").read_text() == "old"  # still the old one meanwhile
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no .old left


def test_an_error_keeps_the_old_directory_and_removes_the_temp(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="half way"), atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("half way")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_the_directory_gets_the_umask_mode_not_0700(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    with atomic_dir(tmp_path / "m") as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o777 & ~mask
