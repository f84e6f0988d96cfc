"""The chat app in a real headless Chromium against a real server: streamed replies,
switching characters over one conversation (each reply equal to the engine's greedy
answer over the same history), compare in one batch, stop, errors, keyboard, 375 px, a
20-turn conversation, and hostile card text shown as text."""

import time

import pytest

from loratree.adapters.card_files import write_card
from loratree.models.chat import Message, encode_prompt
from loratree.models.tiny import tiny_tokenizer
from loratree.serve import Request
from loratree.serve.slot_table import BASE
from tests.serve.common import VOCAB
from tests.serve.conftest import lora_adapter, make_engine
from tests.serve.web.conftest import wait_idle

TOK = tiny_tokenizer(VOCAB)
N = 12  # tokens per reply: the page is opened with max_tokens=12, temperature 0

RECORD_PARTS = """() => {
  window.__parts = [];
  const box = document.getElementById("messages");
  new MutationObserver(() => {
    const all = box.querySelectorAll('article[data-role="assistant"] .bubble');
    if (all.length) window.__parts.push(all[all.length - 1].textContent);
  }).observe(box, {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def direct(store):
    """The engine called directly: the reference a served reply must equal."""
    engine = make_engine(store)

    def answer(adapter, turns, n=N):
        ids = encode_prompt([Message(r, c) for r, c in turns], TOK)
        return engine.generate(Request(ids, adapter=adapter, max_new_tokens=n)).text
    return answer


def last_reply(page):
    return page.locator('#messages article[data-role="assistant"]').last


def send(page, text):
    page.fill("#input", text)
    page.press("#input", "Enter")
    reply = last_reply(page)
    reply.locator("xpath=self::*[@data-state!='streaming']").wait_for(timeout=10_000)
    return reply


def test_chat_streams_and_switching_answers_over_the_same_history(page, server, direct):
    _, _, throttle = server
    p = page.page
    page.open()
    p.click('#characters [data-model="pirate"]')
    throttle.delay = 0.02  # a visible stream: a step every 20 ms
    p.evaluate(RECORD_PARTS)
    first = send(p, "w5 w9 w13")
    assert first.get_attribute("data-state") == "done"
    assert first.get_attribute("data-model") == "pirate"
    assert first.locator(".who").inner_text() == "Captain Flint"
    text1 = first.locator(".bubble").inner_text()
    parts = [t for t in dict.fromkeys(p.evaluate("window.__parts")) if t]
    assert len([t for t in parts if t != text1 and text1.startswith(t)]) >= 2, parts
    assert text1 == direct("pirate", [("user", "w5 w9 w13")])
    assert "tok/s" in first.locator(".meta").inner_text()

    throttle.delay = 0.0
    p.click('#characters [data-model="butler"]')
    second = send(p, "w7 w8")
    assert second.get_attribute("data-model") == "butler"
    assert second.locator(".who").inner_text() == "Jeeves"
    history = [("user", "w5 w9 w13"), ("assistant", text1), ("user", "w7 w8")]
    assert second.locator(".bubble").inner_text() == direct("butler", history)
    assert direct("butler", history) != direct("pirate", history)
    page.screenshot("chat")


def test_compare_answers_each_equal_to_its_solo_answer_in_one_batch(page, server, direct):
    _, _, throttle = server
    p = page.page
    page.open()
    p.click("#tab-compare")
    for model in ("tiny", "pirate", "butler", "teacher"):
        box = p.locator(f'#compare-picks [data-model="{model}"] input')
        box.set_checked(model in ("tiny", "pirate", "teacher"))
    throttle.delay = 0.01  # the three requests surely overlap on this shared 2-core box
    p.fill("#compare-input", "w20 w21")
    p.press("#compare-input", "Enter")
    p.wait_for_selector("#compare-batch[data-rows]", timeout=15_000)
    columns = p.locator("#compare-results article")
    assert columns.count() == 3
    for i, model in enumerate(("tiny", "pirate", "teacher")):
        column = columns.nth(i)
        assert column.get_attribute("data-model") == model
        assert column.get_attribute("data-state") == "done"
        adapter = BASE if model == "tiny" else model
        assert column.locator(".bubble").inner_text() == direct(adapter, [("user", "w20 w21")])
    assert p.get_attribute("#compare-batch", "data-rows") == "3"
    assert "one batch" in p.inner_text("#compare-batch")
    page.screenshot("compare")


def test_stop_ends_a_reply_mid_stream_and_frees_its_row(page, server):
    _, state, throttle = server
    p = page.page
    page.open("temperature=0&max_tokens=100")
    throttle.delay = 0.05  # 100 tokens would take 5 s
    p.fill("#input", "w5 w6")
    p.press("#input", "Enter")
    reply = last_reply(p)
    p.wait_for_function("""() => {
        const b = document.querySelector('#messages article[data-role="assistant"] .bubble');
        return b && b.textContent.split(" ").length >= 3; }""", timeout=10_000)
    started = time.monotonic()
    p.keyboard.press("Escape")
    reply.locator("xpath=self::*[@data-state='stopped']").wait_for(timeout=5_000)
    assert time.monotonic() - started < 2.0
    assert reply.locator(".meta").inner_text() == "stopped"
    words = reply.locator(".bubble").inner_text().split()
    assert 3 <= len(words) < 100
    wait_idle(state)  # the server cancelled the request
    assert p.is_visible("#send") and not p.is_visible("#stop")
    page.screenshot("stopped")


def test_errors_show_as_messages(page, server, store, direct, request):
    _, state, _ = server
    request.node.allowed_network = ("404", "429", "503")
    p = page.page
    store.save("ghost", lora_adapter(99), 0)
    page.open()
    p.click('#characters [data-model="ghost"]')
    store.remove("ghost")
    reply = send(p, "w5")
    assert reply.get_attribute("data-state") == "error"
    assert "Unknown adapter" in reply.locator(".error-text").inner_text()
    assert "ghost" in reply.locator(".error-text").inner_text()
    p.locator('#characters [data-model="ghost"]').wait_for(state="detached")  # reloaded

    p.click('#characters [data-model="pirate"]')
    full = state.config.max_in_flight  # the server's room taken by requests in flight
    try:
        state.in_flight += full
        busy = send(p, "w6")
        assert "server is busy" in busy.locator(".error-text").inner_text()
        state.in_flight -= full
        full = 0
        state.draining = True
        draining = send(p, "w7")
        assert "shutting down" in draining.locator(".error-text").inner_text()
    finally:
        state.in_flight -= full
        state.draining = False
    last = send(p, "w8")  # the page goes on, and the unanswered turns were left out
    assert last.get_attribute("data-state") == "done"
    assert last.locator(".bubble").inner_text() == direct("pirate", [("user", "w8")])
    assert p.locator("#messages article.user.unsent").count() == 3
    page.screenshot("errors")


def test_keyboard_only_at_375_px(browser, server, direct, tmp_path):
    from tests.serve.web.browser import Page

    url, _, _ = server
    page = Page(browser, url, tmp_path, viewport={"width": 375, "height": 740})
    p = page.page
    page.open()
    assert p.evaluate("document.documentElement.scrollWidth") <= 375
    for _ in range(30):  # Tab to the character picker
        if p.evaluate("document.activeElement.getAttribute('role')") == "radio":
            break
        p.keyboard.press("Tab")
    before = p.evaluate("document.activeElement.dataset.model")
    p.keyboard.press("ArrowDown")
    chosen = p.evaluate("document.activeElement.dataset.model")
    assert chosen != before
    assert p.get_attribute(f'#characters [data-model="{chosen}"]', "aria-checked") == "true"
    for _ in range(30):  # Tab on to the message box
        if p.evaluate("document.activeElement.id") == "input":
            break
        p.keyboard.press("Tab")
    p.keyboard.type("w9 w10")
    p.keyboard.press("Enter")
    reply = last_reply(p)
    reply.locator("xpath=self::*[@data-state='done']").wait_for(timeout=10_000)
    assert reply.get_attribute("data-model") == chosen
    assert reply.locator(".bubble").inner_text() == direct(
        BASE if chosen == "tiny" else chosen, [("user", "w9 w10")])
    p.keyboard.press("Alt+1")  # the shortcut: the base model
    assert p.get_attribute('#characters [data-model="tiny"]', "aria-checked") == "true"
    assert p.evaluate("document.documentElement.scrollWidth") <= 375
    page.screenshot("narrow")
    page.close()


def test_twenty_turns_stay_responsive(page, request):
    # a conversation past the context gets 400 context_length_exceeded, and the page
    # retries without the oldest turns: those 400s are expected here
    request.node.allowed_network = ("400",)
    p = page.page
    page.open("temperature=0&max_tokens=4")
    p.click('#characters [data-model="teacher"]')
    took = []
    for i in range(20):
        started = time.monotonic()
        reply = send(p, f"w{5 + i} w{30 + i}")
        took.append(time.monotonic() - started)
        assert reply.get_attribute("data-state") == "done", reply.inner_text()
    assert p.locator('#messages article[data-role="assistant"]').count() == 20
    # the tiny model's 128-token context fills up: the oldest turns are left out, not failed
    assert p.locator('#messages article[data-trimmed="true"]').count() > 0
    assert max(took) < 3.0, took
    page.screenshot("twenty-turns")


def test_hostile_card_text_is_shown_as_text(page, store, tmp_path):
    p = page.page
    staging = tmp_path / "xss"
    from loratree.adapters import save_adapter

    save_adapter(lora_adapter(5), staging, 0)
    hostile = '<img src=x onerror="window.__xss=1">'
    write_card(staging, {"display_name": hostile,
                         "description": "<script>window.__xss=2</script>"})
    store.add("x-s-s", staging)
    try:
        page.open()
        item = p.locator('#characters [data-model="x-s-s"]')
        assert item.locator(".who").inner_text() == hostile
        assert p.evaluate("window.__xss") is None
        assert p.locator("#characters img, #characters script").count() == 0
    finally:
        store.remove("x-s-s")


def test_store_view_shows_the_tree_and_the_live_state(page, store, tmp_path):
    from loratree.adapters import save_adapter
    from loratree.adapters.node_files import write_record
    from loratree.tree import nodes

    store.save("mentor", lora_adapter(20), 0)
    d = save_adapter(lora_adapter(21), tmp_path / "strict")
    write_record(d, nodes.record_for(store, "mentor", metrics={"eval_loss": 0.5}))
    store.add("mentor/strict", d)
    try:
        p = page.page
        page.open()
        p.click("#tab-store")
        child = p.locator('#tree li[data-model="mentor"] li[data-model="mentor/strict"]')
        assert "path rank 4" in child.inner_text() and "eval_loss 0.500" in child.inner_text()
        assert child.locator(".badge.stale").count() == 0
        p.wait_for_selector("#live dt")
        assert "Requests in flight" in p.inner_text("#live")
        store.save("mentor", lora_adapter(22), 0)  # the parent changes: the child is stale
        page.open()
        p.click("#tab-store")
        child.locator(".badge.stale").wait_for(timeout=5_000)
        page.screenshot("store")
    finally:
        store.remove("mentor/strict")
        store.remove("mentor")
