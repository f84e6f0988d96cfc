"""``response_format`` through a live server, with the real ``openai`` client and
``langchain-openai``: valid JSON over many sampled requests in a mixed batch, free rows
unaffected, bad schemas refused by name, streaming."""

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import openai
import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.serve.conftest import live
from tests.serve.json_vocab import ORDER, POINT, json_engine, violations

MODELS = ("a00", "a01", "a02", "tiny")  # three adapters and the base
FORMATS = (({"type": "json_object"}, {"type": "object"}),
           ({"type": "json_schema", "json_schema": {"name": "point", "schema": POINT,
                                                    "strict": True}}, POINT),
           ({"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER}},
            ORDER))


@pytest.fixture(scope="module")
def server(many):
    with live(many, json_engine(many, max_batch=16)) as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="none", max_retries=0)


def _constrained(client, i):
    fmt, schema = FORMATS[i % 3]
    model = MODELS[i % 4]
    if i % 2:
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"json {i}"}],
            response_format=fmt, temperature=1.0, seed=i, max_tokens=300)
        choice, text = r.choices[0], r.choices[0].message.content
    else:
        r = client.completions.create(model=model, prompt=f"json {i}:", temperature=1.0,
                                      seed=i, max_tokens=300,
                                      extra_body={"response_format": fmt})
        choice, text = r.choices[0], r.choices[0].text
    return choice.finish_reason, text, schema


def _free(client, model):
    r = client.completions.create(model=model, prompt="the", temperature=0, max_tokens=16,
                                  extra_body={"ignore_eos": True})
    return r.choices[0].text, r.usage.completion_tokens


def test_fifty_sampled_requests_are_valid_json_and_free_rows_unaffected(server, client):
    with ThreadPoolExecutor(max_workers=54) as pool:
        constrained = [pool.submit(_constrained, client, i) for i in range(50)]
        free = [pool.submit(_free, client, m) for m in MODELS]
        results = [f.result() for f in constrained]
        mixed = [f.result() for f in free]
    for finish, text, schema in results:
        assert finish == "stop", text
        assert violations(json.loads(text), schema) == [], text
    assert server[1].engine.grammars.compiles == 3  # once per schema, not per request
    assert mixed == [_free(client, m) for m in MODELS]  # each alone now


def test_stream_of_a_constrained_chat_is_valid_json(client):
    chunks = list(client.chat.completions.create(
        model="a01", messages=[{"role": "user", "content": "a point"}], stream=True,
        response_format=FORMATS[1][0], temperature=1.0, seed=3, max_tokens=300))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert violations(json.loads(text), POINT) == []


def test_budget_out_first_is_length_and_partial(client):
    r = client.chat.completions.create(
        model="a00", messages=[{"role": "user", "content": "x"}], max_tokens=3,
        response_format=FORMATS[2][0])
    assert r.choices[0].finish_reason == "length"
    assert '{"id":'.startswith(r.choices[0].message.content)


def _schema_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}


@pytest.mark.parametrize(("fmt", "says"), [
    (_schema_format(5), "schema"),
    (_schema_format([{"type": "object"}]), "schema"),
    (_schema_format({"type": "colour"}), "colour"),
    (_schema_format({"$ref": "#/$defs/nowhere"}), "nowhere"),
    (_schema_format({"type": "string", "format": "mood"}), "mood"),
    ({"type": "json_schema"}, "json_schema"),
    ({"type": "xml"}, "type"),
    ({"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}}, "name"),
])
def test_bad_response_format_is_a_400_naming_it_and_the_server_goes_on(server, fmt, says):
    url = server[0]
    body = {"model": "a00", "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 4, "response_format": fmt}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format" and says in error["message"], error
    ok = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                    json={**body, "response_format": {"type": "json_object"}, "max_tokens": 300})
    assert ok.status_code == 200
    json.loads(ok.json()["choices"][0]["message"]["content"])


def test_tools_are_refused_by_name(server):
    body = {"model": "a00", "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}
    r = httpx.post(f"{server[0]}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "tools"
    assert "response_format" in r.json()["error"]["message"]


class At(BaseModel):
    x: int = Field(ge=0, le=99)
    y: float


class Shape(BaseModel):
    name: str = Field(max_length=6)
    kind: Literal["dot", "line", "box"]
    at: At
    tags: list[Literal["a", "b"]] = Field(max_length=3)


def test_langchain_structured_output_and_stream(server):
    sent = []

    def record(request: httpx.Request) -> None:
        sent.append(json.loads(request.content))

    llm = ChatOpenAI(base_url=f"{server[0]}/v1", api_key="none", model="a02", temperature=1.0,
                     seed=5, max_tokens=300, max_retries=0,
                     http_client=httpx.Client(event_hooks={"request": [record]}))
    shape = llm.with_structured_output(Shape).invoke("a shape, please")
    assert isinstance(shape, Shape) and 0 <= shape.at.x <= 99
    fmt = sent[-1]["response_format"]  # langchain-openai's default: a strict json_schema
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"]["additionalProperties"] is False
    chunks = list(llm.stream("hello"))
    assert len(chunks) > 3 and sent[-1]["stream"] is True
    assert "".join(c.content for c in chunks)
