"""adapter="auto": the router follows the store (adds, replaces, removes) and leaves out,
by name, an adapter whose routing centroid is damaged, malformed or of another width,
while the others keep routing."""

import json
import logging
import random
import shutil

import pytest

from loratree.adapters import AdapterStore
from loratree.adapters.folder_source import FolderSource
from loratree.adapters.routing_files import ROUTING_NAME, write_centroid
from loratree.errors import AdapterNotFoundError
from loratree.models.tiny import tiny_tokenizer
from loratree.serve import Engine, Request
from loratree.serve.router import Router
from loratree.serve.slot_table import SlotTable
from loratree.surgery.features import prompt_features
from loratree.tree.cache import AdapterCache
from tests.serve.common import VOCAB, adapter_dir, tiny_model
from tests.serve.conftest import QV, lora_adapter

RANGES = {"low": (3, 8), "high": (50, 55), "mid": (25, 30)}
"""Each "task" draws its prompts from its own small vocabulary."""


def prompts(name, n, seed):
    lo, hi = RANGES[name]
    rng = random.Random(seed)
    return [[rng.randint(lo, hi) for _ in range(rng.randint(3, 8))] for _ in range(n)]


def routed_adapter(tmp_path, model, name, seed):
    """An adapter directory with a centroid over ``name``'s prompts, as train writes it."""
    source = adapter_dir(tmp_path, name, QV, seed)
    write_centroid(source, prompt_features(model, prompts(name, 40, seed)))
    return source


def accuracy(router, names):
    held_out = [(n, p) for n in names for p in prompts(n, 10, 99)]
    return sum(router.route(p).adapter == want for want, p in held_out) / len(held_out)


@pytest.fixture
def model():
    return tiny_model()


def test_router_follows_adds_replaces_and_removes(tmp_path, model):
    store = AdapterStore(tmp_path / "store")
    store.add("low", routed_adapter(tmp_path, model, "low", 1))
    store.add("high", routed_adapter(tmp_path, model, "high", 2))
    store.save("plain", lora_adapter(3), 0)  # no centroid: served, never routed to
    router = Router(store, model)
    assert router.names == ["high", "low"] and router.skipped == {}
    assert accuracy(router, ["low", "high"]) >= 0.9

    store.add("mid", routed_adapter(tmp_path, model, "mid", 4))  # added after the start
    assert accuracy(router, ["mid"]) >= 0.8  # its prompts go to it
    assert router.names == ["high", "low", "mid"]
    store.remove("high")
    router.route(prompts("low", 1, 5)[0])
    assert router.names == ["low", "mid"]


def test_a_damaged_centroid_is_left_out_by_name_and_the_others_route(tmp_path, model,
                                                                     caplog):
    store = AdapterStore(tmp_path / "store")
    for i, name in enumerate(RANGES):
        store.add(name, routed_adapter(tmp_path, model, name, i))
    # bytes changed at rest, the size kept: still valid JSON and a valid centroid of the
    # right width, but not the file that was added (only the manifest's hash catches it)
    at_rest = store.path_of("mid") / ROUTING_NAME
    text = at_rest.read_text()
    digit = next(i for i in range(text.index("[") + 4, len(text)) if text[i].isdigit())
    at_rest.chmod(0o644)
    at_rest.write_text(text[:digit] + str((int(text[digit]) + 5) % 10) + text[digit + 1:])
    json.loads(at_rest.read_text())
    with caplog.at_level(logging.WARNING, logger="loratree.serve.router"):
        router = Router(store, model)
        router.route(prompts("low", 1, 5)[0])
    assert router.names == ["high", "low"]
    assert "mid" in router.skipped and "sha256" in router.skipped["mid"], router.skipped
    assert sum("'mid' left out of auto routing" in r.message for r in caplog.records) == 1
    assert accuracy(router, ["low", "high"]) >= 0.9

    # the same engine keeps serving: auto requests, and a request that names the others
    table = SlotTable(model, AdapterCache(store, 10**7), n_slots=2, max_rank=8)
    engine = Engine(tiny_model(), tiny_tokenizer(VOCAB), table)
    try:
        done = engine.generate(Request(prompts("high", 1, 6)[0], adapter="auto",
                                       max_new_tokens=3))
        assert done.adapter == "high" and len(done.tokens) == 3
        assert len(engine.generate(Request([5, 6], adapter="low", max_new_tokens=2)).tokens) == 2
    finally:
        engine.close()


@pytest.mark.parametrize("text,problem", [
    ("{not json", "not a valid routing file"),
    ('{"centroid": [1.0, "x"]}', "finite numbers"),
    ('{"centroid": [1.0, 2.0, 3.0]}', "routing centroid of size 3"),
])
def test_a_malformed_centroid_in_a_plain_folder_is_left_out(tmp_path, model, text, problem):
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copytree(routed_adapter(tmp_path, model, "low", 1), folder / "low")
    bad = shutil.copytree(routed_adapter(tmp_path, model, "high", 2), folder / "high")
    (bad / ROUTING_NAME).write_text(text)
    router = Router(FolderSource(folder), model)
    assert router.names == ["low"]
    assert problem in router.skipped["high"], router.skipped


def test_an_adapter_whose_weights_do_not_read_is_left_out(tmp_path, model):
    """A good centroid beside weights holding NaN (a plain folder: no hash to catch it)."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copytree(routed_adapter(tmp_path, model, "low", 1), folder / "low")
    bad = shutil.copytree(routed_adapter(tmp_path, model, "high", 2), folder / "high")
    weights = load_file(bad / "adapter_model.safetensors")
    first = next(iter(weights))
    weights[first] = weights[first].clone().fill_(float("nan"))
    save_file(weights, bad / "adapter_model.safetensors")
    router = Router(FolderSource(folder), model)
    assert router.names == ["low"]
    assert "non-finite" in router.skipped["high"] or "NaN" in router.skipped["high"], \
        router.skipped


def test_no_usable_centroid_names_what_was_left_out(tmp_path, model):
    folder = tmp_path / "folder"
    folder.mkdir()
    bad = shutil.copytree(routed_adapter(tmp_path, model, "high", 2), folder / "high")
    (bad / ROUTING_NAME).write_text("[]")
    router = Router(FolderSource(folder), model)
    with pytest.raises(AdapterNotFoundError, match=r"left out: high: .*routing file"):
        router.route([5, 6, 7])
