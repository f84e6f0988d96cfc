"""``call_asgi`` (how a replica runs loratree's HTTP layer) without Ray: the same answer as
the live server, streams arrive in pieces, and closing early cancels the request."""

import asyncio
import json
import time

import httpx
import pytest

from loratree.integrations.ray.asgi_call import HttpCall, ResponseStart, call_asgi
from loratree.serve.http import ServerConfig, create_app
from tests.serve.conftest import live, make_engine

JSON = ((b"content-type", b"application/json"),)


def completion(stream=False, tokens=8):
    body = {"model": "a01", "prompt": [5, 9, 13], "max_tokens": tokens, "temperature": 0,
            "stream": stream}
    return HttpCall("POST", "/v1/completions", b"", JSON, json.dumps(body).encode())


async def collect(app, call, keep=None):
    out = []
    agen = call_asgi(app, call)
    async for item in agen:
        out.append(item)
        if keep is not None and len(out) == keep:
            await agen.aclose()
            break
    return out


@pytest.fixture
def app(twelve):
    engine = make_engine(twelve)
    engine.start()
    yield create_app(engine, ServerConfig(base_name="tiny"))
    engine.close()


def test_an_answer_equals_the_live_servers(twelve, app):
    start, *chunks = asyncio.run(collect(app, completion()))
    assert isinstance(start, ResponseStart) and start.status == 200
    assert start.header("Content-Type") == "application/json"
    with live(twelve) as (url, _):
        served = httpx.post(f"{url}/v1/completions", json=json.loads(completion().body))
    assert json.loads(b"".join(chunks))["choices"] == served.json()["choices"]
    missing = HttpCall("GET", "/v1/nothing", b"", (), b"")
    start, *chunks = asyncio.run(collect(app, missing))
    assert start.status == 404 and json.loads(b"".join(chunks))["error"]


def test_a_stream_arrives_in_pieces_and_closing_it_cancels_the_request(app):
    start, *events = asyncio.run(collect(app, completion(stream=True)))
    assert start.header("content-type").startswith("text/event-stream")
    assert len(events) >= 3 and events[-1] == b"data: [DONE]\n\n"
    state = app.state.loratree
    asyncio.run(collect(app, completion(stream=True, tokens=100), keep=2))
    end = time.monotonic() + 10
    while state.in_flight or app.state.loratree.engine.busy():
        assert time.monotonic() < end, "the closed stream's request kept running"
        time.sleep(0.05)
