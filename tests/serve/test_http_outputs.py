"""The OpenAI API's outputs with the real ``openai`` client on a live server, in mixed
batches of three adapters and the base: logprobs (and echoed prompt logprobs) equal a
log-softmax of PEFT's logits, lists of prompts answer in order, ``n`` choice j equals the
same request alone with seed + j, streams carry choice indices and logprobs, usage counts
every choice."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import peft
import pytest
import torch

from loratree.models.chat import Message, encode_prompt
from loratree.models.tiny import tiny_tokenizer
from loratree.serve.slot_table import BASE
from tests.serve.common import VOCAB, tiny_model
from tests.serve.conftest import live

TOK = tiny_tokenizer(VOCAB)
PROMPTS = [[5, 9, 13, 3, 40], [7, 7, 8], [30, 31, 32, 33, 34, 35], [11, 50, 12]]
CHAT = [{"role": "user", "content": "w5 w9 w13"}]
CHAT_IDS = encode_prompt([Message("user", "w5 w9 w13")], TOK)


def _client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)


def _ids(tokens):
    return TOK.convert_tokens_to_ids(list(tokens))


_PEFT: dict = {}


def _peft_lp(store, name, seq):
    """log_softmax of PEFT's logits (T, V) over ``seq``, ``name`` loaded by PEFT on a
    fresh tiny model (the base: none)."""
    key = (store.root, name)
    if key not in _PEFT:
        model = tiny_model()
        if name != BASE:
            model = peft.PeftModel.from_pretrained(model, store.path_of(name)).eval()
        _PEFT[key] = model
    model = _PEFT[key]
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].float(), -1)


def _close(a, b):
    return abs(a - b) < 1e-4


def _at_once(*calls):
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(c) for c in calls]
        return [f.result() for f in futures]


def test_echo_and_logprobs_in_a_mixed_batch_equal_peft(many):
    with live(many) as (url, _):
        c = _client(url)
        loglik, chat, batch, plain = _at_once(
            lambda: c.completions.create(  # lm-eval's loglikelihood request
                model="a01", prompt=PROMPTS[:3], echo=True, logprobs=1, max_tokens=1,
                temperature=0, seed=1234),
            lambda: c.chat.completions.create(model="a02", messages=CHAT, max_tokens=4,
                                              temperature=0, logprobs=True, top_logprobs=3),
            lambda: c.completions.create(model="tiny", prompt=["w11 w50", "w7 w7 w8"],
                                         max_tokens=3, temperature=0, logprobs=2),
            lambda: c.chat.completions.create(model="all-r4", messages=CHAT, max_tokens=5,
                                              temperature=0))
    assert [ch.index for ch in loglik.choices] == [0, 1, 2]
    assert loglik.usage.prompt_tokens == sum(len(p) for p in PROMPTS[:3])
    assert loglik.usage.completion_tokens == 3
    for prompt, ch in zip(PROMPTS, loglik.choices, strict=False):
        lp = ch.logprobs
        assert ch.text.startswith(TOK.decode(prompt))
        seq = _ids(lp.tokens)
        assert seq[:-1] == prompt and len(seq) == len(prompt) + 1
        want = _peft_lp(many, "a01", seq)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for i in range(1, len(seq)):
            assert _close(lp.token_logprobs[i], float(want[i - 1, seq[i]]))
            assert _close(max(lp.top_logprobs[i].values()), float(want[i - 1].max()))
        assert lp.text_offset[0] == 0
    content = chat.choices[0].logprobs.content
    seq = CHAT_IDS + _ids(e.token for e in content)
    want = _peft_lp(many, "a02", seq)[len(CHAT_IDS) - 1:-1]
    for e, row in zip(content, want, strict=True):
        assert _close(e.logprob, float(row.max()))  # greedy: the most probable token
        assert e.bytes == list(e.token.encode())
        top = torch.topk(row, 3)
        assert _ids(t.token for t in e.top_logprobs) == top.indices.tolist()
        assert all(_close(t.logprob, float(v)) for t, v in zip(e.top_logprobs, top.values,
                                                               strict=True))
    for prompt, ch in zip([[11, 50], [7, 7, 8]], batch.choices, strict=True):
        lp = ch.logprobs
        assert TOK.decode(_ids(lp.tokens)) == ch.text
        want = _peft_lp(many, BASE, prompt + _ids(lp.tokens))[len(prompt) - 1:-1]
        for tok, value, top, row in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, want,
                                        strict=True):
            assert _close(value, float(row[_ids([tok])[0]]))
            assert len(top) == 2 and _close(max(top.values()), float(row.max()))
    assert plain.choices[0].logprobs is None and len(plain.choices) == 1


def test_n_choices_equal_seeds_alone_and_usage_counts_every_choice(many):
    sampled = {"max_tokens": 5, "temperature": 1.0, "seed": 11, "extra_body":
               {"ignore_eos": True}}
    with live(many) as (url, _):
        c = _client(url)
        both, chat, _ = _at_once(
            lambda: c.completions.create(model="a03", prompt=[PROMPTS[0], PROMPTS[3]], n=3,
                                         **sampled),
            lambda: c.chat.completions.create(model="all-r4", messages=CHAT, n=2, **sampled),
            lambda: c.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=4))
        alone = [c.completions.create(model="a03", prompt=p, **{**sampled, "seed": 11 + j})
                 for p in (PROMPTS[0], PROMPTS[3]) for j in range(3)]
        chat_alone = [c.chat.completions.create(model="all-r4", messages=CHAT,
                                                **{**sampled, "seed": 11 + j})
                      for j in range(2)]
    assert [ch.index for ch in both.choices] == list(range(6))
    assert [ch.text for ch in both.choices] == [a.choices[0].text for a in alone]
    assert len({ch.text for ch in both.choices[:3]}) > 1
    assert both.usage.prompt_tokens == len(PROMPTS[0]) + len(PROMPTS[3])  # once per prompt
    assert both.usage.completion_tokens == 6 * 5
    assert [ch.message.content for ch in chat.choices] == [
        a.choices[0].message.content for a in chat_alone]
    assert chat.usage.completion_tokens == 2 * 5
    assert chat.usage.prompt_tokens == len(CHAT_IDS)


def test_streams_carry_choice_indices_and_logprobs(many):
    sampled = {"max_tokens": 4, "temperature": 0.9, "seed": 5, "n": 2,
               "extra_body": {"ignore_eos": True}}
    with live(many) as (url, _):
        c = _client(url)
        whole_c = c.completions.create(model="a04", prompt=PROMPTS[1], logprobs=2, **sampled)
        whole_chat = c.chat.completions.create(model="a05", messages=CHAT, logprobs=True,
                                               top_logprobs=1, **sampled)
        chunks_c, chunks_chat = _at_once(
            lambda: list(c.completions.create(model="a04", prompt=PROMPTS[1], logprobs=2,
                                              stream=True, **sampled)),
            lambda: list(c.chat.completions.create(
                model="a05", messages=CHAT, logprobs=True, top_logprobs=1, stream=True,
                stream_options={"include_usage": True}, **sampled)))
    for j in range(2):
        mine = [ch.choices[0] for ch in chunks_c if ch.choices and ch.choices[0].index == j]
        assert "".join(x.text for x in mine) == whole_c.choices[j].text
        got = [v for x in mine if x.logprobs for v in x.logprobs.token_logprobs]
        assert got == pytest.approx(whole_c.choices[j].logprobs.token_logprobs, abs=1e-5)
        assert mine[-1].finish_reason == "length"
        mine = [ch.choices[0] for ch in chunks_chat if ch.choices and ch.choices[0].index == j]
        assert "".join(x.delta.content or "" for x in mine) == (
            whole_chat.choices[j].message.content)
        got = [e.logprob for x in mine if x.logprobs for e in x.logprobs.content]
        assert got == pytest.approx(
            [e.logprob for e in whole_chat.choices[j].logprobs.content], abs=1e-5)
    assert chunks_chat[-1].usage.completion_tokens == 8


def test_echo_with_max_tokens_0_gives_prompt_logprobs_only(many):
    with live(many) as (url, _):
        got = _client(url).completions.create(model="a06", prompt=PROMPTS[2], echo=True,
                                              logprobs=0, max_tokens=0)
    ch = got.choices[0]
    assert ch.text == TOK.decode(PROMPTS[2]) and got.usage.completion_tokens == 0
    want = _peft_lp(many, "a06", PROMPTS[2])
    assert _ids(ch.logprobs.tokens) == PROMPTS[2]
    for i, value in enumerate(ch.logprobs.token_logprobs[1:], start=1):
        assert _close(value, float(want[i - 1, PROMPTS[2][i]]))


def test_echo_in_a_stream_equals_the_whole_response(many):
    """Each choice's first chunk carries its prompt (text, and the prompt tokens' logprobs);
    the joined stream equals the whole response, logprobs and text offsets included."""
    with live(many) as (url, _):
        c = _client(url)
        for extra in ({"logprobs": 2, "max_tokens": 3, "n": 2, "temperature": 0.8,
                       "seed": 5},
                      {"logprobs": 0, "max_tokens": 0},
                      {"max_tokens": 2, "temperature": 0}):
            args = {"model": "a03", "prompt": [PROMPTS[0], PROMPTS[2]], "echo": True,
                    **extra}
            whole = c.completions.create(**args)
            parts = {}
            for chunk in c.completions.create(**args, stream=True):
                for ch in chunk.choices:
                    parts.setdefault(ch.index, []).append(ch)
            assert sorted(parts) == [ch.index for ch in whole.choices]
            for want in whole.choices:
                got = parts[want.index]
                prompt = args["prompt"][want.index // extra.get("n", 1)]
                assert got[0].text.startswith(TOK.decode(prompt))  # the prompt comes first
                assert "".join(ch.text for ch in got) == want.text
                if "logprobs" not in extra:
                    assert all(ch.logprobs is None for ch in got)
                    continue
                joined = {key: [v for ch in got if ch.logprobs
                                for v in getattr(ch.logprobs, key)]
                          for key in ("tokens", "token_logprobs", "top_logprobs",
                                      "text_offset")}
                assert joined == {key: getattr(want.logprobs, key) for key in joined}


def _error(response, param):
    assert response.status_code == 400, response.text
    err = response.json()["error"]
    assert err["param"] == param, err
    return err


def test_bad_output_parameters_are_400_naming_them(many):
    body = {"model": "a01", "prompt": PROMPTS[0], "max_tokens": 2}
    chat = {"model": "a01", "messages": CHAT, "max_tokens": 2}
    with live(many) as (url, _), httpx.Client(base_url=url) as http:
        def post(path, **extra):
            return http.post(path, json={**(body if "chat" not in path else chat), **extra})

        _error(post("/v1/completions", logprobs=21), "logprobs")
        _error(post("/v1/chat/completions", top_logprobs=2), "top_logprobs")
        _error(post("/v1/chat/completions", logprobs=True, top_logprobs=21), "top_logprobs")
        _error(post("/v1/completions", prompt=[]), "prompt")
        _error(post("/v1/completions", prompt=[[1, 2], [VOCAB + 3]]), "prompt")
        _error(post("/v1/completions", prompt=[[1, 2]] * 9, n=8), "prompt")  # 72 > 64
        _error(post("/v1/completions", n=9), "n")  # more than a batch's rows
        _error(post("/v1/completions", suffix="x"), "suffix")
        _error(post("/v1/completions", best_of=3), "best_of")
        _error(post("/v1/completions", max_tokens=0), "max_tokens")
        _error(post("/v1/completions", presence_penalty=1.0), "presence_penalty")
        _error(post("/v1/chat/completions", tools=[{"type": "function"}]), "tools")
        ok = post("/v1/completions", best_of=2, n=2)
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 2


def test_lm_eval_loglikelihood_batches_equal_peft_beside_other_adapters(many, tmp_path):
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    TOK.save_pretrained(tmp_path / "tok")
    greedy = [int(_peft_lp(many, "a01", [11, 50]).argmax(-1)[-1])]  # a01's own next token
    pairs = [("w5 w9", " w13 w3"), ("w7", " w7 w8"), ("w11 w50", " " + TOK.decode(greedy))]
    with live(many) as (url, _):
        lm = LocalCompletionsAPI(base_url=f"{url}/v1/completions", model="a01",
                                 tokenizer_backend="huggingface",
                                 tokenizer=str(tmp_path / "tok"), batch_size=3, max_retries=1)
        c = _client(url)
        got, *_ = _at_once(
            lambda: lm.loglikelihood([Instance("loglikelihood", {}, p, i)
                                      for i, p in enumerate(pairs)]),
            lambda: c.chat.completions.create(model="a02", messages=CHAT, max_tokens=4),
            lambda: c.completions.create(model="all-r4", prompt=PROMPTS[0], max_tokens=4),
            lambda: c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=4))
    for (context, continuation), (ll, is_greedy) in zip(pairs, got, strict=True):
        ctx = TOK(context, add_special_tokens=False)["input_ids"]
        cont = TOK(continuation, add_special_tokens=False)["input_ids"]
        want = _peft_lp(many, "a01", ctx + cont)[len(ctx) - 1:-1]
        rows = range(len(cont))
        assert _close(ll, sum(float(want[i, cont[i]]) for i in rows))
        assert is_greedy == all(int(want[i].argmax()) == cont[i] for i in rows)
    assert [g for _, g in got] == [False, False, True]
