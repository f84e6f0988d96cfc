"""load_base: HF directories load with equal logits; bad sources say what was expected."""

import json
from pathlib import Path

import pytest
import torch

from loratree.models import ModelNotFoundError, load_base, random_tokens, tiny_llama
from loratree.models import load as load_mod


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("as_path", [False, True])
def test_saved_tiny_llama_loads_with_equal_logits_and_its_tokenizer(tiny_llama_dir, as_path):
    source = tiny_llama_dir if as_path else str(tiny_llama_dir)
    model, tokenizer = load_base(source)
    assert not model.training
    ids = random_tokens(128, batch=2, seq=8, seed=0)
    assert torch.equal(_logits(model, ids), _logits(tiny_llama(), ids))
    assert tokenizer is not None
    assert tokenizer("w5 w7 nope")["input_ids"] == [5, 7, 0]


def test_directory_without_tokenizer_files_gives_tokenizer_none(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "m")
    model, tokenizer = load_base(tmp_path / "m")
    assert tokenizer is None and not model.training


def test_dtype_is_applied(tiny_llama_dir):
    model, _ = load_base(tiny_llama_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("alias", [None, "embedded", "SmolLM2", "smollm2-135m-instruct"])
def test_embedded_aliases_load_the_converted_directory(monkeypatch, tiny_llama_dir, alias):
    asked = []
    monkeypatch.setattr(load_mod, "embedded_model_dir", lambda c: asked.append(c) or tiny_llama_dir)
    model, tokenizer = load_base(alias, cache_dir="/some/cache")
    assert asked == ["/some/cache"] and tokenizer is not None and not model.training


def test_missing_path_is_a_value_error_and_a_file_not_found_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match=r"no-such-model'? does not exist") as info:
        load_base(missing)
    assert isinstance(info.value, ValueError) and isinstance(info.value, FileNotFoundError)


def test_a_path_named_like_an_alias_is_a_path(tmp_path):
    with pytest.raises(ModelNotFoundError):
        load_base(tmp_path / "embedded")


def _text_file(tmp_path: Path) -> Path:
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 16)
    return tmp_path / "weights.bin"


def _empty_dir(tmp_path: Path) -> Path:
    return tmp_path


def _adapter_dir(tmp_path: Path) -> Path:
    (tmp_path / "adapter_config.json").write_text("{}")
    return tmp_path


def _dir_with_gguf(tmp_path: Path) -> Path:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    return tmp_path


def _garbage_gguf(tmp_path: Path) -> Path:
    (tmp_path / "m.gguf").write_bytes(b"not a gguf file at all")
    return tmp_path / "m.gguf"


def _corrupt_weights(tmp_path: Path) -> Path:
    tiny_llama().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    return tmp_path


def _remote_code(tmp_path: Path) -> Path:
    # A model that needs its own code must be refused, never prompted for or run.
    auto_map = {"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": auto_map}))
    (tmp_path / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    return tmp_path


BAD = {
    "not-gguf-file": (_text_file, "is not a .gguf file"),
    "no-config": (_empty_dir, "has no config.json"),
    "adapter-dir": (_adapter_dir, "that is an adapter"),
    "dir-with-gguf": (_dir_with_gguf, "pass the file itself"),
    "garbage-gguf": (_garbage_gguf, "cannot load GGUF model"),
    "corrupt-weights": (_corrupt_weights, "cannot load base model"),
    "remote-code": (_remote_code, "cannot load base model"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_source_gives_value_error_naming_it(tmp_path, case):
    make, message = BAD[case]
    source = make(tmp_path)
    with pytest.raises(ValueError, match=message) as info:
        load_base(source)
    assert str(source) in str(info.value)
