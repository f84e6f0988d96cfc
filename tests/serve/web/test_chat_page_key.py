"""The chat app on a server with an API key: the page loads without the key (it holds no
data), every API call needs it, and the page asks for it and then works."""

import httpx
import pytest

from loratree.serve.http import ServerConfig, create_app
from loratree.serve.server import serve_in_thread
from tests.serve.conftest import make_engine
from tests.serve.web.browser import Page

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def keyed(store):
    app = create_app(make_engine(store), ServerConfig(base_name="tiny", api_key=KEY))
    with serve_in_thread(app) as url:
        yield url


def test_page_is_open_but_its_data_needs_the_key(keyed):
    assert httpx.get(f"{keyed}/").status_code == 200
    assert httpx.get(f"{keyed}/web/static/app.js").status_code == 200
    for path in ("/web/api/characters", "/web/api/state", "/v1/models",
                 "/web/static/../api/characters"):
        assert httpx.get(f"{keyed}{path}").status_code == 401, path
    ok = httpx.get(f"{keyed}/web/api/characters", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and len(ok.json()["characters"]) == 4


def test_the_page_asks_for_the_key_then_chats(browser, keyed, tmp_path):
    page = Page(browser, keyed, tmp_path, viewport={"width": 1100, "height": 700})
    p = page.page
    p.goto(f"{keyed}/?temperature=0&max_tokens=6")
    p.wait_for_selector("#key-form:not([hidden])", timeout=10_000)
    assert "API key" in p.inner_text("#banner")
    p.fill("#key-input", "wrong")
    p.press("#key-input", "Enter")
    p.wait_for_selector("#key-form:not([hidden])")
    p.fill("#key-input", KEY)
    p.press("#key-input", "Enter")
    p.wait_for_selector("body[data-ready=true]", timeout=10_000)
    assert p.is_hidden("#banner") and p.is_hidden("#key-form")
    p.fill("#input", "w5 w9")
    p.press("#input", "Enter")
    p.wait_for_selector('#messages article[data-state="done"]', timeout=10_000)
    page.screenshot("api-key")
    page.close(allowed_network=("401",))
