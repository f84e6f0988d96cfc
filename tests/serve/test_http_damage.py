"""A store damaged at rest, served live: a request for a damaged entry gets a 422 that names
it and the fix, while concurrent requests for good adapters are served exactly, and the
engine stays healthy."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from loratree.adapters import AdapterStore
from loratree.models.tiny import tiny_tokenizer
from tests.adapters.damage import EXPECTED, OLD, damage_all
from tests.serve.common import VOCAB, solo_reference
from tests.serve.conftest import live, make_engine

PROMPT = [5, 9, 13, 3, 40]
GOOD = ("a01", "a02", "prefix")


@pytest.fixture(scope="module")
def damaged(many, tmp_path_factory):
    store = AdapterStore(tmp_path_factory.mktemp("damaged"))
    for name in GOOD:
        store.add(name, many.path_of(name))
    outside = tmp_path_factory.mktemp("outside")
    damage_all(store, many.path_of("a03"), many.path_of("all-r4"), outside)
    return store


def _complete(client, name):
    try:
        r = client.completions.create(model=name, prompt=PROMPT, max_tokens=6, temperature=0)
    except openai.APIStatusError as e:
        return e.status_code, e.body
    return 200, r.choices[0].text


def test_damaged_entries_get_422_and_good_ones_serve_on(damaged, tmp_path_factory):
    tok = tiny_tokenizer(VOCAB)
    want = {n: tok.decode(solo_reference(damaged, n, PROMPT, 6)[0], skip_special_tokens=True)
            for n in (*GOOD, OLD)}
    engine = make_engine(damaged, cache_adapters=4, slots=4)
    with live(damaged, engine) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        names = [*EXPECTED, *GOOD, OLD] * 2     # all at once, damaged and good mixed
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda n: (n, *_complete(client, n)), names))
        for name, status, body in results:
            if name in EXPECTED:
                assert status == 422, (name, body)
                assert body["code"] == "adapter_damaged" and body["param"] == "model"
                assert f"adapter '{name}' is damaged" in body["message"]
                assert f"loratree store add {name} DIR" in body["message"]
                assert "/tmp" not in body["message"] and "Traceback" not in body["message"]
            else:
                assert (status, body) == (200, want[name]), name
        models = {m.id for m in client.models.list()}
        assert {*GOOD, OLD} <= models and not models & (set(EXPECTED) - {"team/d-nan",
                                                                         "d-flipped"})
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "ok" and health["engine_errors"] == 0, health
