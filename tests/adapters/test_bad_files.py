"""Malformed and hostile adapter files: a typed error naming the problem, model untouched."""

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratree import surgery
from loratree.adapters import load_adapter, save_adapter
from loratree.config import LoraConfig
from loratree.errors import (
    AdapterConfigError,
    AdapterFileError,
    CorruptFileError,
    MissingKeyError,
    NonFiniteError,
    ShapeMismatchError,
    UnexpectedKeyError,
    UnsafeFormatError,
)
from loratree.models.tiny import tiny_llama
from tests.conftest import randomize_slot

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture
def good(tmp_path):
    m = tiny_llama()
    surgery.inject(m, LoraConfig(rank=4, targets=("q_proj", "v_proj")))
    randomize_slot(m, 0)
    return save_adapter(m, tmp_path / "good")


def _rewrite(path, edit):
    tensors = load_file(str(path / "adapter_model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "adapter_model.safetensors"))


def _corrupt_truncate(p):
    f = p / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def _corrupt_header_len(p):
    f = p / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(data) * 10) + data[8:])


def _corrupt_shape(p):
    _rewrite(p, lambda t: t.__setitem__(f"{Q0}.lora_B.weight", torch.zeros(31, 4)))


def _corrupt_missing(p):
    _rewrite(p, lambda t: t.pop(f"{Q0}.lora_B.weight"))


def _corrupt_missing_module(p):
    _rewrite(p, lambda t: (t.pop(f"{Q0}.lora_A.weight"), t.pop(f"{Q0}.lora_B.weight")))


def _corrupt_unexpected(p):
    def edit(t):
        t["base_model.model.nope.lora_A.weight"] = torch.zeros(4, 4)
        t["base_model.model.nope.lora_B.weight"] = torch.zeros(4, 4)
    _rewrite(p, edit)


def _corrupt_nan(p):
    def edit(t):
        t[f"{Q0}.lora_A.weight"][0, 0] = float("nan")
    _rewrite(p, edit)


def _corrupt_rank(p):
    cfg = json.loads((p / "adapter_config.json").read_text())
    cfg["r"] = 8
    (p / "adapter_config.json").write_text(json.dumps(cfg))


def _corrupt_pickle(p):
    (p / "adapter_model.safetensors").rename(p / "adapter_model.bin")


def _corrupt_config_json(p):
    (p / "adapter_config.json").write_text("{not json")


def _corrupt_config_kind(p):
    cfg = json.loads((p / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (p / "adapter_config.json").write_text(json.dumps(cfg))


def _corrupt_random_bytes(p):
    (p / "adapter_model.safetensors").write_bytes(b"\x00\x01garbage" * 3)


CASES = {
    "truncated": (_corrupt_truncate, CorruptFileError, "truncated"),
    "header_len": (_corrupt_header_len, CorruptFileError, "header length"),
    "random_bytes": (_corrupt_random_bytes, CorruptFileError, "adapter_model"),
    "wrong_shape": (_corrupt_shape, ShapeMismatchError, "q_proj"),
    "missing_half": (_corrupt_missing, MissingKeyError, "has lora_A but not lora_B"),
    "missing_module": (_corrupt_missing_module, MissingKeyError, "layers.0.self_attn.q_proj"),
    "unexpected": (_corrupt_unexpected, UnexpectedKeyError, "nope"),
    "nan": (_corrupt_nan, NonFiniteError, "q_proj.lora_A"),
    "rank_mismatch": (_corrupt_rank, ShapeMismatchError, "rank 4"),
    "pickle_bin": (_corrupt_pickle, UnsafeFormatError, "adapter_model.bin"),
    "config_not_json": (_corrupt_config_json, AdapterConfigError, "not valid JSON"),
    "config_kind": (_corrupt_config_kind, AdapterConfigError, "peft_type"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_file_gives_typed_error_and_leaves_model_usable(case, good, tmp_path):
    corrupt, error, words = CASES[case]
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    corrupt(bad)
    m = tiny_llama()
    ids = torch.randint(0, 128, (2, 5))
    before = m(ids).logits
    with pytest.raises(error, match=words) as info:
        load_adapter(m, bad)
    assert isinstance(info.value, AdapterFileError | NonFiniteError)
    assert not surgery.lora_layers(m)  # nothing was injected
    assert torch.equal(m(ids).logits, before)
    assert load_adapter(m, good) == 0  # and the process goes on working


def test_writes_leave_no_temp_files(good):
    assert sorted(p.name for p in good.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors",
    ]
