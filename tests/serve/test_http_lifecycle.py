"""vLLM's runtime adapter lifecycle (/v1/load_lora_adapter, /v1/unload_lora_adapter) on a
real server with real clients: vLLM's bodies and codes, the flag, the API key, bad files
refused before anything is served, and a hot replace under load that never mixes
versions."""

import json
import logging
import shutil
import threading
import time
from dataclasses import replace

import httpx
import pytest

from loratree import surgery
from loratree.adapters import AdapterStore, save_adapter
from loratree.adapters.node_files import write_record
from loratree.config import LoraConfig
from loratree.models.tiny import tiny_llama, tiny_tokenizer
from loratree.serve.http import ServerConfig, create_app
from loratree.tree import nodes
from tests.conftest import randomize_slot
from tests.serve.common import VOCAB, dir_reference
from tests.serve.conftest import QV, live, lora_adapter, make_engine

PROMPT = [5, 9, 13, 3, 40]
TOK = tiny_tokenizer(VOCAB)
ON = {"allow_runtime_lora_updating": True}


def _dir(tmp_path, label, seed, config=QV):
    return save_adapter(lora_adapter(seed, config), tmp_path / label, 0)


def _text(path, n):
    return TOK.decode(dir_reference(path, PROMPT, n)[0], skip_special_tokens=True)


def _vllm_error(r, status, kind):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and err["type"] == kind, err
    assert "/tmp" not in err["message"] and "Traceback" not in err["message"]
    return err["message"]


def _complete(http, model, n=6):
    return http.post("/v1/completions", json={"model": model, "prompt": PROMPT,
                                              "max_tokens": n, "temperature": 0,
                                              "ignore_eos": True})


@pytest.fixture
def store(tmp_path):
    store = AdapterStore(tmp_path / "store")
    store.save("a", lora_adapter(100), 0)
    return store


def _live(store, **config):
    return live(store, make_engine(store), **config)


def test_load_and_unload_answer_like_vllm(store, tmp_path):
    first, second = _dir(tmp_path, "first", 1), _dir(tmp_path, "second", 2)
    with _live(store, **ON) as (url, _), httpx.Client(base_url=url, timeout=30) as http:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "new", "lora_path": str(first)})
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'new' added successfully."
        assert "new" in [m["id"] for m in http.get("/v1/models").json()["data"]]
        assert _complete(http, "new").json()["choices"][0]["text"] == _text(first, 6)

        again = http.post("/v1/load_lora_adapter", json={"lora_name": "new",
                                                         "lora_path": str(second)})
        assert "has already been loaded" in _vllm_error(again, 400, "InvalidUserInput")
        for body in ({}, {"lora_name": "x"}, {"lora_path": str(first)},
                     {"lora_name": "", "lora_path": str(first)}):
            r = http.post("/v1/load_lora_adapter", json=body)
            assert _vllm_error(r, 400, "InvalidUserInput") == (
                "Both 'lora_name' and 'lora_path' must be provided.")
        missing = http.post("/v1/load_lora_adapter", json={"lora_name": "m",
                                                           "lora_path": str(tmp_path / "no")})
        assert "No adapter found" in _vllm_error(missing, 404, "NotFoundError")
        _vllm_error(http.post("/v1/load_lora_adapter", json={"lora_name": "../x",
                                                             "lora_path": str(first)}),
                    400, "InvalidUserInput")

        r = http.post("/v1/load_lora_adapter", json={"lora_name": "new", "lora_path": str(second),
                                                     "load_inplace": True})
        assert r.status_code == 200, r.text
        assert _complete(http, "new").json()["choices"][0]["text"] == _text(second, 6)

        r = http.post("/v1/unload_lora_adapter", json={"lora_name": "new", "lora_int_id": 7})
        assert r.status_code == 200 and r.text == (
            "Success: LoRA adapter 'new' removed successfully.")
        assert "new" not in store and _complete(http, "new").status_code == 404
        assert "new" not in [m["id"] for m in http.get("/v1/models").json()["data"]]
        gone = http.post("/v1/unload_lora_adapter", json={"lora_name": "new"})
        assert _vllm_error(gone, 404, "NotFoundError") == (
            "The lora adapter 'new' cannot be found.")
        for body in ({}, {"lora_int_id": 1}):
            _vllm_error(http.post("/v1/unload_lora_adapter", json=body), 400,
                        "InvalidUserInput")
        assert _complete(http, "a").status_code == 200


def test_without_the_flag_the_routes_do_not_exist(store, tmp_path):
    path = _dir(tmp_path, "d", 1)
    with _live(store) as (url, _), httpx.Client(base_url=url, timeout=30) as http:
        assert http.post("/v1/load_lora_adapter", json={"lora_name": "n", "lora_path": str(
            path)}).status_code == 404
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "a"}).status_code == 404
    assert store.names() == ["a"]


def test_the_api_key_guards_the_routes_and_no_key_is_warned(store, tmp_path, caplog):
    path = _dir(tmp_path, "d", 1)
    body = {"lora_name": "n", "lora_path": str(path)}
    with _live(store, api_key="s3cret", **ON) as (url, _), httpx.Client(base_url=url) as http:
        assert http.post("/v1/load_lora_adapter", json=body).status_code == 401
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "a"}).status_code == 401
        assert "n" not in store and "a" in store
        auth = {"Authorization": "Bearer s3cret"}
        assert http.post("/v1/load_lora_adapter", json=body, headers=auth).status_code == 200
    assert not [r for r in caplog.records if "no API key" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="loratree.serve.http"):
        create_app(make_engine(store), ServerConfig(**ON))
    assert any("no API key is set" in r.getMessage() for r in caplog.records)


def _bad_dirs(tmp_path):
    good = _dir(tmp_path, "good", 3)
    out = {}
    for label, damage in (("truncated", "weights"), ("not-json", "config")):
        d = tmp_path / label
        shutil.copytree(good, d)
        if damage == "weights":
            data = (d / "adapter_model.safetensors").read_bytes()
            (d / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
        else:
            (d / "adapter_config.json").write_text("{not json")
        out[label] = d
    wide = tiny_llama(vocab=VOCAB, hidden=48)  # q_proj/v_proj of another width
    surgery.inject(wide, QV)
    randomize_slot(wide, 0, std=0.3, seed=4)
    out["wrong-shape"] = save_adapter(wide, tmp_path / "wide", 0)
    out["rank-too-large"] = _dir(tmp_path, "r16", 5, LoraConfig(rank=16, alpha=16,
                                                                targets=("q_proj",)))
    return out


@pytest.mark.parametrize("inplace", [False, True])
def test_bad_files_get_400_naming_the_problem_and_nothing_changes(store, tmp_path, inplace):
    words = {"truncated": "truncated", "not-json": "not valid JSON",
             "wrong-shape": "shape", "rank-too-large": "rank 16"}
    before = _text(store.path_of("a"), 6)
    with _live(store, **ON) as (url, _), httpx.Client(base_url=url, timeout=30) as http:
        for label, path in _bad_dirs(tmp_path).items():
            name = "a" if inplace else f"bad-{label}"
            r = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(
                path), "load_inplace": inplace})
            assert words[label] in _vllm_error(r, 400, "BadRequestError"), label
            assert store.names() == ["a"]
            assert _complete(http, "a").json()["choices"][0]["text"] == before
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["tiny", "a"]
    assert not list(store.objects.glob(".tmp-*"))


def test_a_tree_node_is_checked_with_its_whole_path(store, tmp_path):
    """The served rank of a node is its path's: "a" (r=2) with a r=7 branch is 9, past the
    engine's max_rank of 8, and refused at load (not on the first request); r=4 fits."""
    too_big, fits = (_dir(tmp_path, f"child-r{r}", 7 + r, replace(QV, rank=r, alpha=r))
                     for r in (7, 4))
    for d in (too_big, fits):
        write_record(d, nodes.record_for(store, "a"))
    orphan = _dir(tmp_path, "orphan", 3)
    write_record(orphan, replace(nodes.record_for(store, "a"), parent="gone"))
    with _live(store, **ON) as (url, _), httpx.Client(base_url=url, timeout=30) as http:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "a/big",
                                                     "lora_path": str(too_big)})
        assert "rank 9" in _vllm_error(r, 400, "BadRequestError")
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "gone/x",
                                                     "lora_path": str(orphan)})
        assert "gone" in _vllm_error(r, 400, "BadRequestError")
        assert store.names() == ["a"]
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "a/fit",
                                                     "lora_path": str(fits)})
        assert r.status_code == 200, r.text
        assert _complete(http, "a/fit").status_code == 200
    assert store.names() == ["a", "a/fit"]


def _stream(http, model, n):
    return http.stream("POST", "/v1/completions", json={
        "model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0,
        "ignore_eos": True, "stream": True})


def _stream_text(lines):
    chunks = [json.loads(x.removeprefix("data: ")) for x in lines
              if x.startswith("data: ") and x != "data: [DONE]"]
    return "".join(c["choices"][0]["text"] for c in chunks)


def test_hot_replace_under_load_never_fails_or_mixes_versions(store, tmp_path):
    """Clients loop on adapter x while x is replaced in place, back and forth; each time
    a streamed request is running on x across the replace and a new request is admitted
    during it. No request fails, each answer is entirely the old version's or the new
    one's (both references computed alone), and the stream finishes on the old one."""
    versions = [_dir(tmp_path, "va", 11), _dir(tmp_path, "vb", 12)]
    n = 24
    refs = [dir_reference(p, PROMPT, n)[0] for p in versions]
    assert refs[0][0] != refs[1][0]
    texts = [TOK.decode(r, skip_special_tokens=True) for r in refs]
    store.add("x", versions[0])
    answers, failures, done = [], [], threading.Event()
    engine = make_engine(store)
    forward = engine.model.forward

    def paced(*a, **k):  # 15 ms a step: a request runs long enough to span a replace
        time.sleep(0.015)
        return forward(*a, **k)

    def client(url):
        with httpx.Client(base_url=url, timeout=60) as http:
            while not done.is_set():
                r = _complete(http, "x", n)
                if r.status_code != 200:
                    failures.append(r.text)
                else:
                    answers.append(r.json()["choices"][0]["text"])

    engine.model.forward = paced
    with live(store, engine, **ON) as (url, state), httpx.Client(base_url=url,
                                                                 timeout=60) as http:
        threads = [threading.Thread(target=client, args=(url,)) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            for i in (1, 0):
                with _stream(http, "x", n) as running:
                    lines = running.iter_lines()
                    head = [next(lines)]  # the request runs on the old version now
                    r = http.post("/v1/load_lora_adapter", json={
                        "lora_name": "x", "lora_path": str(versions[i]), "load_inplace": True})
                    assert r.status_code == 200, r.text
                    fresh = _complete(http, "x", n).json()["choices"][0]["text"]
                    old = _stream_text(head + list(lines))
                assert (old, fresh) == (texts[1 - i], texts[i])
        finally:
            done.set()
            for t in threads:
                t.join(timeout=60)
        assert state.engine.faults == 0
    assert not failures, failures[:3]
    assert answers and set(answers) <= set(texts), set(answers) - set(texts)
