"""``--adapters-dir``: plain folders of PEFT adapters served with no ``store add``, on a
real server with real clients: PEFT's tokens, new folders without a restart, a file
rewritten while serving never half-read, and a copy inside a store root named."""

import threading
import time

import httpx
import openai
import pytest
import torch

from loratree import surgery
from loratree.adapters import AdapterStore, save_adapter
from loratree.adapters.folder_source import FolderSource
from loratree.config import LoraConfig, PrefixConfig
from loratree.models.tiny import tiny_tokenizer
from loratree.tree.store_source import serving_sources
from tests.conftest import rewrite_in_place
from tests.serve.common import VOCAB, dir_reference, peft_references, tiny_model
from tests.serve.conftest import live, lora_adapter, make_engine

PROMPT = [5, 9, 13, 3, 40]
TOK = tiny_tokenizer(VOCAB)
WEIGHTS = "adapter_model.safetensors"
GREEDY = {"ignore_eos": True}
ALL4 = LoraConfig(rank=4, alpha=8, targets=("all-linear",))


def _text(tokens):
    return TOK.decode(tokens, skip_special_tokens=True)


def _prefix(path):
    model = tiny_model()
    g = torch.Generator().manual_seed(5)
    surgery.add_prefix(model, PrefixConfig(n_virtual=3),
                       vectors=torch.randn(3, surgery.geometry(model).width, generator=g))
    return save_adapter(model, path, 0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """20 PEFT LoRA adapters at depth 1 to 3 and one prefix adapter, written by
    ``save_adapter`` (PEFT's format), never added to a store."""
    root = tmp_path_factory.mktemp("plain")
    names = []
    for i in range(20):
        name = (f"solo{i:02d}", f"team{i % 3}/a{i:02d}", f"org/team{i % 2}/b{i:02d}")[i % 3]
        model = lora_adapter(200 + i, ALL4) if i % 4 == 0 else lora_adapter(200 + i)
        save_adapter(model, root / name, 0)
        names.append(name)
    _prefix(root / "styles" / "prefix")
    return root, names


def test_a_folder_of_adapters_serves_peft_tokens_with_no_store(folder):
    root, names = folder
    engine = make_engine(FolderSource(root), cache_adapters=22)
    assert engine.table.cache.store is None
    with live(engine.table.cache.source, engine) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        ids = [m.id for m in client.models.list().data]
        assert ids[0] == "tiny" and set(ids[1:]) == {*names, "styles/prefix"}
        refs = peft_references([root / name for name in names], PROMPT, 4)
        assert len({tuple(r) for r in refs}) > 10  # the adapters differ visibly
        for name, ref in zip(names, refs, strict=True):
            got = client.completions.create(model=name, prompt=PROMPT, max_tokens=4,
                                            temperature=0, extra_body=GREEDY)
            assert got.choices[0].text == _text(ref), name
        got = client.completions.create(model="styles/prefix", prompt=PROMPT, max_tokens=4,
                                        temperature=0, extra_body=GREEDY)
        assert got.choices[0].text == _text(dir_reference(root / "styles" / "prefix",
                                                          PROMPT, 4)[0])
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="new/one", prompt=PROMPT, max_tokens=2)
        save_adapter(lora_adapter(77), root / "new" / "one", 0)  # no restart, no rescan
        got = client.completions.create(model="new/one", prompt=PROMPT, max_tokens=4,
                                        temperature=0, extra_body=GREEDY)
        assert got.choices[0].text == _text(peft_references([root / "new" / "one"], PROMPT, 4)[0])
        assert "new/one" in [m.id for m in client.models.list().data]


def test_a_file_rewritten_while_serving_is_never_served_half_read(tmp_path):
    """A writer rewrites x's weights in place, non-atomically (truncate, then chunks with
    pauses), A and B in turn, while a client keeps asking for x: every answer is A's or
    B's reference, or a clear 422; never a 500; most succeed."""
    root = tmp_path / "plain"
    path = save_adapter(lora_adapter(1), root / "x", 0)
    other = save_adapter(lora_adapter(2), tmp_path / "b", 0)
    blobs = [(path / WEIGHTS).read_bytes(), (other / WEIGHTS).read_bytes()]
    refs = [_text(dir_reference(p, PROMPT, 6)[0]) for p in (path, other)]
    texts = set(refs)
    assert len(texts) == 2
    stop = threading.Event()

    def writer():
        rewrite_in_place(path / WEIGHTS, blobs, stop, mode="wb", pause=0.06)

    engine = make_engine(FolderSource(root))
    answers, errors = [], []
    with live(engine.table.cache.source, engine) as (url, _), httpx.Client(
            base_url=url, timeout=30) as http:
        thread = threading.Thread(target=writer)
        thread.start()
        try:
            end = time.monotonic() + 2.5
            while time.monotonic() < end:
                r = http.post("/v1/completions", json={"model": "x", "prompt": PROMPT,
                                                       "max_tokens": 6, "temperature": 0,
                                                       "ignore_eos": True})
                if r.status_code == 200:
                    answers.append(r.json()["choices"][0]["text"])
                else:
                    errors.append((r.status_code, r.json()["error"]["message"]))
        finally:
            stop.set()
            thread.join()
        for k in (0, 1, 0):  # once the file is still, the next request serves it
            (path / WEIGHTS).write_bytes(blobs[k])
            time.sleep(0.05)
            r = http.post("/v1/completions", json={"model": "x", "prompt": PROMPT,
                                                   "max_tokens": 6, "temperature": 0,
                                                   "ignore_eos": True})
            assert r.json()["choices"][0]["text"] == refs[k]
        assert http.get("/health").json()["status"] == "ok"
    assert all(status == 422 for status, _ in errors), errors[:3]
    assert set(answers) <= texts and len(answers) > 2 * len(errors), (len(answers), errors)


def test_a_copy_inside_the_store_root_is_404_with_the_command_that_adds_it(tmp_path):
    store = AdapterStore(tmp_path / "store")
    store.save("real", lora_adapter(3), 0)
    save_adapter(lora_adapter(4), store.root / "copied", 0)
    engine = make_engine(serving_sources(store))
    with live(store, engine) as (url, _):
        r = httpx.post(f"{url}/v1/completions", json={"model": "copied", "prompt": PROMPT,
                                                      "max_tokens": 2})
        assert r.status_code == 404
        message = r.json()["error"]["message"]
        assert "loratree store --store <store> add copied <store>/copied" in message
        assert str(tmp_path) not in message
