"""The HTTP server with real clients (openai, httpx) on 127.0.0.1: answers equal the
engine's, and every error has OpenAI's shape and the right status."""

import json
import time

import httpx
import openai
import pytest
import torch

from loratree.models.tiny import tiny_tokenizer
from loratree.serve import Request
from loratree.serve.slot_table import BASE
from tests.serve.common import VOCAB, solo_reference
from tests.serve.conftest import live, make_engine

PROMPT = [5, 9, 13, 3, 40]
TOK = tiny_tokenizer(VOCAB)


def _client(url, key="none"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


def _text(tokens):
    return TOK.decode(tokens, skip_special_tokens=True)


def test_openai_client_gets_completions_and_streamed_chat_equal_to_the_engine(many):
    messages = [{"role": "user", "content": "w5 w9 w13"}]
    direct = make_engine(many)
    want = {}
    for model in (BASE, "a03", "all-r4"):
        want[model, "completion"] = direct.generate(Request(PROMPT, adapter=model,
                                                            max_new_tokens=6))
        from loratree.models.chat import Message, encode_prompt
        ids = encode_prompt([Message("user", "w5 w9 w13")], TOK)
        want[model, "chat"] = direct.generate(Request(ids, adapter=model, max_new_tokens=6))
    with live(many) as (url, _):
        client = _client(url)
        for model in (BASE, "a03", "all-r4"):
            name = "tiny" if model == BASE else model
            got = client.completions.create(model=name, prompt=PROMPT, max_tokens=6,
                                            temperature=0)
            ref = want[model, "completion"]
            assert got.choices[0].text == ref.text
            assert got.usage.completion_tokens == len(ref.tokens) == 6
            assert got.usage.prompt_tokens == len(PROMPT)
            assert list(ref.tokens) == solo_reference(many, model, PROMPT, 6)[0]
            stream = client.chat.completions.create(
                model=name, messages=messages, max_tokens=6, temperature=0, stream=True,
                stream_options={"include_usage": True})
            chunks = list(stream)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == want[model, "chat"].text
            assert chunks[-1].usage.completion_tokens == 6
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert want["a03", "completion"].text != want[BASE, "completion"].text


def test_models_lists_base_and_adapters_without_paths(many):
    with live(many) as (url, _):
        models = _client(url).models.list()
        ids = [m.id for m in models.data]
        assert ids[0] == "tiny" and {"a00", "a19", "all-r4", "prefix"} <= set(ids)
        raw = httpx.get(f"{url}/v1/models").text
        assert str(many.root) not in raw and ".objects" not in raw


def _error(response, status, param=None):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in err["message"] and "/tmp" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def test_errors_have_openai_shape_and_status(many):
    body = {"model": "a01", "prompt": PROMPT, "max_tokens": 3}
    with live(many, max_body_bytes=4096) as (url, _), httpx.Client(base_url=url) as http:
        _error(http.post("/v1/completions", json={**body, "model": "no-such"}), 404, "model")
        _error(http.post("/v1/completions", json={**body, "model": "../etc/passwd"}), 400,
               "model")
        _error(http.post("/v1/completions", json={**body, "temperature": 5}), 400,
               "temperature")
        _error(http.post("/v1/completions", json={**body, "max_tokens": 0}), 400, "max_tokens")
        _error(http.post("/v1/completions", json={**body, "max_tokens": 10_000}), 400,
               "max_tokens")
        _error(http.post("/v1/completions", json={**body, "n": 9}), 400, "n")  # > max_batch
        _error(http.post("/v1/completions", json={**body, "prompt": [VOCAB + 1]}), 400,
               "prompt")
        _error(http.post("/v1/completions", json={**body, "bogus": 1}), 400, "bogus")
        _error(http.post("/v1/chat/completions", json={"model": "a01", "messages": []}), 400,
               "messages")
        _error(http.post("/v1/completions", content=b"{not json",
                         headers={"content-type": "application/json"}), 400)
        _error(http.post("/v1/completions", json={**body, "prompt": "w1 " * 3000}), 413)
        _error(http.get("/v1/nothing-here"), 404)
        ok = http.post("/v1/completions", json=body)
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"


def test_api_key_guards_everything_but_health_and_ready(many):
    with live(many, api_key="s3cret") as (url, _), httpx.Client(base_url=url) as http:
        assert http.get("/health").status_code == 200
        assert http.get("/ready").status_code == 200
        _error(http.get("/v1/models"), 401)
        _error(http.get("/metrics", headers={"Authorization": "Bearer wrong"}), 401)
        assert http.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).is_success
        with pytest.raises(openai.AuthenticationError):
            _client(url, "nope").models.list()
        assert _client(url, "s3cret").completions.create(model="a00", prompt=PROMPT,
                                                         max_tokens=2).choices


def test_deadline_gives_504_and_frees_the_row(many):
    engine = make_engine(many)
    with live(many, engine, request_timeout_s=0.3) as (url, state):
        slow = engine.model.forward

        def crawl(*a, **k):
            time.sleep(0.05)
            return slow(*a, **k)

        engine.model.forward = crawl
        r = httpx.post(f"{url}/v1/completions", json={"model": "a02", "prompt": PROMPT,
                                                      "max_tokens": 100}, timeout=30)
        _error(r, 504)
        end = time.monotonic() + 10
        while engine.busy() and time.monotonic() < end:
            time.sleep(0.02)
        assert not engine.busy() and state.in_flight == 0
        assert all(s.users == 0 for s in engine.table._slots)


def test_client_disconnect_mid_stream_cancels_generation(many):
    engine = make_engine(many)
    with live(many, engine) as (url, state):
        with httpx.stream("POST", f"{url}/v1/completions", timeout=30,
                          json={"model": "a04", "prompt": PROMPT, "max_tokens": 120,
                                "stream": True, "ignore_eos": True}) as r:
            assert r.status_code == 200
            next(r.iter_lines())
        end = time.monotonic() + 10
        while (engine.busy() or state.in_flight) and time.monotonic() < end:
            time.sleep(0.02)
        assert not engine.busy() and state.in_flight == 0
        assert all(s.users == 0 for s in engine.table._slots)


def test_non_finite_adapter_fails_alone_and_engine_failure_is_reported(many, tmp_path):
    from loratree.adapters import AdapterStore
    from tests.serve.conftest import lora_adapter

    store = AdapterStore(tmp_path)
    store.add("good", many.path_of("a05"))
    bad = lora_adapter(1)
    from loratree import surgery
    with torch.no_grad():
        for m in surgery.lora_layers(bad).values():
            m.lora_b[0].fill_(3e38)
    store.save("overflow", bad, 0)
    engine = make_engine(store)
    with live(store, engine) as (url, _), httpx.Client(base_url=url, timeout=30) as http:
        body = {"prompt": PROMPT, "max_tokens": 4}
        err = _error(http.post("/v1/completions", json={**body, "model": "overflow"}), 422)
        assert "non-finite" in err["message"]
        assert http.post("/v1/completions", json={**body, "model": "good"}).status_code == 200
        forward = engine.model.forward
        engine.model.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
        _error(http.post("/v1/completions", json={**body, "model": "good"}), 500)
        health = http.get("/health")
        assert health.status_code == 503 and "boom" in health.json()["last_error"]
        engine.model.forward = forward
        assert http.post("/v1/completions", json={**body, "model": "good"}).status_code == 200
        health = http.get("/health").json()
        assert health["status"] == "ok" and health["engine_errors"] >= 1


def test_metrics_count_requests_tokens_and_cache(many):
    with live(many) as (url, _), httpx.Client(base_url=url, timeout=30) as http:
        for name in ("a00", "a01", "a00"):
            http.post("/v1/completions", json={"model": name, "prompt": PROMPT,
                                               "max_tokens": 3, "ignore_eos": True})
        http.post("/v1/completions", json={"model": "zzz", "prompt": PROMPT})
        text = http.get("/metrics").text
    values = _parse(text)
    assert values['loratree_requests_total{route="/v1/completions",status="200"}'] == 3
    assert values['loratree_requests_total{route="/v1/completions",status="404"}'] == 1
    assert values['loratree_adapter_requests_total{adapter="a00"}'] == 2
    assert values['loratree_tokens_total{kind="completion"}'] == 9
    assert values["loratree_adapter_cache_misses_total"] == 2
    assert values["loratree_request_latency_seconds_count"] == 3
    assert values["loratree_requests_in_flight"] == 0


def _parse(text):
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_admin_routes_load_and_unload_by_name_only(many):
    with live(many, admin=True) as (url, state), httpx.Client(base_url=url) as http:
        r = http.post("/admin/adapters/a07/load")
        assert r.status_code == 200 and r.json()["loaded"] == "a07"
        assert "a07" in state.engine.table.cache
        assert http.post("/admin/adapters/a07/unload").json()["was_cached"]
        assert "a07" not in state.engine.table.cache
        _error(http.post("/admin/adapters/%2Fetc%2Fpasswd/load"), 400)
        _error(http.post("/admin/adapters/nope/load"), 404)
    with live(many) as (url, _):
        _error(httpx.post(f"{url}/admin/adapters/a07/load"), 404)


def test_streamed_events_are_well_formed(many):
    with live(many) as (url, _), httpx.stream(
            "POST", f"{url}/v1/chat/completions", timeout=30,
            json={"model": "prefix", "messages": [{"role": "user", "content": "w3"}],
                  "max_tokens": 4, "stream": True}) as r:
        lines = [x for x in r.iter_lines() if x]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(x.removeprefix("data: ")) for x in lines[:-1]]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["object"] == "chat.completion.chunk" for e in events)
