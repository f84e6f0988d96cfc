"""The chat app's JSON routes and files over a real server: characters with cards and tree
facts (parents, ranks, metrics, stale marks), lenient with damaged cards and entries; the
live state with decode steps by batch rows (also in /metrics); `web=False` serves none of
it; the static files are the package's and fetch nothing from elsewhere."""

import json
import logging
import re

import httpx
import pytest

from loratree.adapters import AdapterStore, save_adapter
from loratree.adapters.card_files import CARD_NAME, default_card, write_card
from loratree.adapters.node_files import write_record
from loratree.adapters.store_check import MANIFEST_NAME
from loratree.serve.webapp import STATIC_DIR
from loratree.tree import nodes
from tests.serve.conftest import QV, live, lora_adapter


@pytest.fixture
def tree_store(tmp_path):
    """support (r=2) -> support/fr (r=2, eval_loss) ; solo with a card; all on the tiny."""
    store = AdapterStore(tmp_path / "store")
    store.save("support", lora_adapter(1), 0)
    d = save_adapter(lora_adapter(2), tmp_path / "fr")
    write_record(d, nodes.record_for(store, "support", metrics={"eval_loss": 1.25}))
    store.add("support/fr", d)
    d = save_adapter(lora_adapter(3), tmp_path / "solo")
    write_card(d, {"display_name": "Solo", "color": "#123456"})
    store.add("solo", d)
    return store


def _by_model(url):
    body = httpx.get(f"{url}/web/api/characters").json()
    return body, {c["model"]: c for c in body["characters"]}


def test_characters_list_the_base_and_adapters_with_cards_and_tree_facts(tree_store):
    with live(tree_store) as (url, _):
        body, chars = _by_model(url)
        assert [c["model"] for c in body["characters"]] == ["tiny", "solo", "support",
                                                            "support/fr"]
        assert chars["tiny"]["kind"] == "base" and chars["tiny"]["display_name"] == "Base model"
        assert chars["solo"]["display_name"] == "Solo" and chars["solo"]["color"] == "#123456"
        default = default_card("support/fr")
        fr = chars["support/fr"]
        assert (fr["display_name"], fr["color"]) == (default.display_name, default.color)
        assert fr["description"] == "lora adapter, rank 2"
        assert fr["parent"] == "support" and fr["path_rank"] == 4 and fr["rank"] == QV.rank
        assert fr["metrics"] == {"eval_loss": 1.25} and fr["stale"] is False
        assert chars["support"]["parent"] is None and chars["support"]["size"] > 0
        tree_store.save("support", lora_adapter(9), 0)  # the parent changes: fr is stale
        assert _by_model(url)[1]["support/fr"]["stale"] is True
        assert str(tree_store.root) not in json.dumps(body)


def test_a_damaged_card_or_entry_never_breaks_the_listing(tree_store, caplog):
    version = tree_store.path_of("solo")
    # a version added before content hashes were recorded: its bad card is not caught as
    # damage at rest (with a manifest it would be, and the entry listed as damaged)
    (version / MANIFEST_NAME).unlink()
    (version / CARD_NAME).write_text('{"display_name": 5}')
    (tree_store.path_of("support") / "adapter_config.json").write_text("{oops")
    with live(tree_store) as (url, _), caplog.at_level(logging.WARNING):
        response = httpx.get(f"{url}/web/api/characters")
        assert response.status_code == 200
        body, chars = _by_model(url)
        assert chars["solo"]["display_name"] == default_card("solo").display_name
        assert [d["name"] for d in body["damaged"]] == ["support"]
        assert str(tree_store.root) not in json.dumps(body)
        assert chars["support/fr"]["parent"] == "support"  # still listed (the page hangs it
        # from the trunk, since its parent is not listed)
    assert "solo" in caplog.text and CARD_NAME in caplog.text


def test_state_counts_decode_steps_by_batch_rows_and_metrics_show_them(many):
    with live(many) as (url, _state):
        before = httpx.get(f"{url}/web/api/state").json()
        assert before["in_flight"] == 0 and before["ready"] and before["batch_rows"] == 0
        assert set(before["cache"]) >= {"hits", "misses", "evictions", "bytes", "budget"}
        body = {"model": "a01", "prompt": [5, 6, 7], "max_tokens": 4}
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200
        after = httpx.get(f"{url}/web/api/state").json()
        assert sum(after["step_rows"].values()) > sum(before["step_rows"].values())
        metrics = httpx.get(f"{url}/metrics").text
        assert re.search(r'loratree_decode_steps_total\{rows="1"\} [1-9]', metrics), metrics


def test_the_page_and_its_files_are_served_and_self_contained(many):
    with live(many) as (url, _):
        page = httpx.get(f"{url}/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        for name in sorted(p.name for p in STATIC_DIR.iterdir()):
            got = httpx.get(f"{url}/web/static/{name}")
            assert got.status_code == 200, name
            assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", got.text), name
        assert httpx.get(f"{url}/web/static/../http.py").status_code == 404


def test_web_false_serves_the_api_only(many):
    with live(many, web=False) as (url, _):
        assert httpx.get(f"{url}/").status_code == 404
        assert httpx.get(f"{url}/web/api/state").status_code == 404
        assert httpx.get(f"{url}/v1/models").status_code == 200
