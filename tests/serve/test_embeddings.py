"""Embeddings (``POST /v1/embeddings``, ``Engine.embed``): each vector equals PEFT's last
hidden state (the final norm's output) mean-pooled over the input's tokens, unit length,
through the named adapter; through the base model it is the prompt's routing feature.
They run in the engine's loop, batched across adapters, beside running generations."""

import base64
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import openai
import peft
import pytest
import torch

from loratree import surgery
from loratree.adapters import AdapterStore
from loratree.config import LoraConfig, PrefixConfig
from loratree.models.tiny import tiny_tokenizer
from loratree.serve import Request
from loratree.serve.embeddings import STEP_ROWS, EmbeddingInputError, EmbeddingJob, run_jobs
from loratree.serve.requests import prompt_ids
from loratree.serve.slot_table import BASE, StepMode
from loratree.surgery.features import prompt_features
from tests.serve.common import VOCAB, adapter_dir, tiny_model
from tests.serve.conftest import QV, live, make_engine

TOK = tiny_tokenizer(VOCAB)
TREE = ["t", "t/u"]
"""A tree node and its parent: serving ``t/u`` composes both."""


def _save(store, tmp, name, config, seed):
    store.add(name, adapter_dir(tmp, name, config, seed, store))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """a0, a1 (q,v r=2), all-r4 (all-linear r=4), prefix (3 tokens), tree t -> t/u."""
    tmp = tmp_path_factory.mktemp("embed")
    store = AdapterStore(tmp / "store")
    _save(store, tmp, "a0", QV, 100)
    _save(store, tmp, "a1", QV, 101)
    _save(store, tmp, "all-r4", LoraConfig(rank=4, alpha=8, targets=("all-linear",)), 7)
    _save(store, tmp, "t", QV, 11)
    _save(store, tmp, "t/u", LoraConfig(rank=3, alpha=5, targets=("all-linear",),
                                        use_rslora=True), 12)
    model = tiny_model()
    geo = surgery.geometry(model)
    surgery.add_prefix(model, PrefixConfig(n_virtual=3), vectors=torch.randn(
        3, geo.width, generator=torch.Generator().manual_seed(5)))
    store.save("prefix", model, 0)
    return store


def _path(name):
    """The adapters PEFT stacks for ``name``: a tree node's whole path, or none (base)."""
    if name in ("tiny", BASE):
        return []
    return TREE if name == "t/u" else [name]


@torch.no_grad()
def peft_embedding(store, name, inputs):
    """The reference: each input alone through PEFT on a fresh model (every adapter of the
    path active at once), ``hidden_states[-1]`` (after the final norm) averaged over its
    tokens, scaled to unit length."""
    model = tiny_model()
    names = _path(name)
    if names:
        model = peft.PeftModel.from_pretrained(model, store.path_of(names[0]), adapter_name="n0")
        for i, n in enumerate(names[1:], 1):
            model.load_adapter(store.path_of(n), adapter_name=f"n{i}")
        if len(names) > 1:
            model.base_model.set_adapter([f"n{i}" for i in range(len(names))])
    out = []
    for ids in inputs:
        h = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1]
        out.append(torch.nn.functional.normalize(h[0].mean(0), dim=0))
    return torch.stack(out)


def _ids(inputs):
    items = [inputs] if isinstance(inputs, str) or isinstance(inputs[0], int) else inputs
    return [prompt_ids(TOK, x) for x in items]


def _client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30)


def _vectors(response, encoding):
    if encoding == "base64":
        return torch.tensor(np.stack([np.frombuffer(base64.b64decode(d.embedding), "<f4")
                                      for d in response.data]))
    return torch.tensor([d.embedding for d in response.data])


CASES = [
    ("a0", "w5 w9 w13"),
    ("a1", ["w3 w4", "w7 w8 w9 w10 w11"]),
    ("all-r4", [5, 9, 13, 3]),
    ("t/u", [[5, 9], [40, 7, 7, 3, 2]]),
    ("prefix", ["w11 w12 w13"]),
    ("tiny", ["w5 w9 w13", "w3 w4"]),
    (BASE, [[5, 9, 13, 3, 40, 7]]),
]


def test_openai_client_gets_peft_equal_embeddings_concurrently_float_and_base64(store):
    with live(store) as (url, _):
        client = _client(url)

        def call(case):
            (model, inputs), encoding = case
            return client.embeddings.create(model=model, input=inputs,
                                            encoding_format=encoding)

        cases = [(c, e) for c in CASES for e in ("float", "base64")]
        with ThreadPoolExecutor(len(cases)) as pool:
            responses = list(pool.map(call, cases))
    for ((model, inputs), encoding), got in zip(cases, responses, strict=True):
        ids = _ids(inputs)
        want = peft_embedding(store, model, ids)
        torch.testing.assert_close(_vectors(got, encoding), want, atol=1e-4, rtol=0)
        assert [d.index for d in got.data] == list(range(len(ids)))
        assert got.model == model and got.object == "list"
        assert got.usage.prompt_tokens == got.usage.total_tokens == sum(map(len, ids))
        if not _path(model):  # through the base model: the routing feature
            torch.testing.assert_close(_vectors(got, encoding),
                                       prompt_features(tiny_model(), ids), atol=1e-5, rtol=0)
    by_model = {m: peft_embedding(store, m, [[5, 9, 13]])[0] for m in ("a0", "a1", "tiny")}
    assert (by_model["a0"] - by_model["a1"]).abs().max() > 1e-2  # the adapter matters
    assert (by_model["a0"] - by_model["tiny"]).abs().max() > 1e-2


def test_a_merged_adapter_stays_merged_and_every_row_gets_its_own_adapter(store):
    engine = make_engine(store)
    prompt = [5, 9, 13, 3, 40]
    solo = make_engine(store).generate(Request(prompt, adapter="a0", max_new_tokens=24,
                                               ignore_eos=True))
    handle = engine.submit(Request(prompt, adapter="a0", max_new_tokens=24, ignore_eos=True))
    while engine.table.merged != "a0":
        engine.step()
    merged_steps = engine.modes[StepMode.MERGED]
    ids = [[5, 9, 13], [7, 3, 3, 2, 8]]
    jobs = [EmbeddingJob(tuple(map(tuple, ids)), name, Future())
            for name in ("a1", "a0", BASE, "t/u")]
    forwards = []
    body = engine.model.base_model
    hook = body.register_forward_hook(lambda *_: forwards.append(1))
    try:
        waiting, error = run_jobs(engine.model, engine.table, jobs, can_wait=True)
    finally:
        hook.remove()
    assert (waiting, error, len(forwards)) == ([], None, 1)  # 4 adapters, one forward
    assert engine.table.merged == "a0"  # left merged for the running batch
    for job in jobs:
        torch.testing.assert_close(job.future.result().vectors,
                                   peft_embedding(store, job.adapter, ids), atol=1e-4, rtol=0)
    got = engine.embed(ids, "a0").result()  # the Python API, here with the loop
    torch.testing.assert_close(got.vectors, peft_embedding(store, "a0", ids), atol=1e-4, rtol=0)
    while not handle.done:
        engine.step()
    assert engine.modes[StepMode.MERGED] > merged_steps
    assert handle.result().tokens == solo.tokens  # the generation did not notice


def test_jobs_past_the_free_slots_wait_and_then_run(store):
    engine = make_engine(store)  # 4 slots, room for 4 adapters in the cache
    names = ["a0", "a1", "all-r4", "prefix", "t/u"]
    jobs = [EmbeddingJob(((5, 9, 13),), n, Future()) for n in names]
    waiting, error = run_jobs(engine.model, engine.table, jobs, can_wait=False)
    assert error is None and [j.adapter for j in waiting] == ["t/u"]
    assert run_jobs(engine.model, engine.table, waiting, can_wait=False) == ([], None)
    for job in jobs:
        torch.testing.assert_close(job.future.result().vectors,
                                   peft_embedding(store, job.adapter, [[5, 9, 13]]),
                                   atol=1e-4, rtol=0)


def test_embeddings_beside_streamed_generations_leave_both_exact(store):
    prompt = [5, 9, 13, 3, 40]
    solo = make_engine(store).generate(Request(prompt, adapter="a0", max_new_tokens=40,
                                               ignore_eos=True))
    engine = make_engine(store)
    with live(store, engine) as (url, _):
        client = _client(url)

        def generate(_):
            stream = client.completions.create(model="a0", prompt=prompt, max_tokens=40,
                                               temperature=0, stream=True,
                                               extra_body={"ignore_eos": True})
            return "".join(c.choices[0].text for c in stream)

        def embed(model):
            return client.embeddings.create(model=model, input=[[5, 9, 13], [7, 3, 2]],
                                            encoding_format="float")

        with ThreadPoolExecutor(8) as pool:
            texts = [pool.submit(generate, i) for i in range(2)]
            vectors = {m: pool.submit(embed, m) for m in ("a0", "a1", "t/u", "tiny") * 3}
            texts = [t.result() for t in texts]
            vectors = {m: v.result() for m, v in vectors.items()}
    assert texts == [solo.text, solo.text]
    assert engine.modes[StepMode.MERGED] > 0
    for model, got in vectors.items():
        torch.testing.assert_close(_vectors(got, "float"),
                                   peft_embedding(store, model, [[5, 9, 13], [7, 3, 2]]),
                                   atol=1e-4, rtol=0)


BAD = [  # (body, status, error.param, error.code)
    ({"model": "nobody", "input": "w5"}, 404, "model", "model_not_found"),
    ({"model": "a0", "input": ""}, 400, "input", "invalid_value"),
    ({"model": "a0", "input": []}, 400, "input", "invalid_value"),
    ({"model": "a0", "input": ["w5", ""]}, 400, "input", "invalid_value"),
    ({"model": "a0", "input": [[5], []]}, 400, "input", "invalid_value"),
    ({"model": "a0", "input": [5, VOCAB]}, 400, "input", "invalid_value"),
    ({"model": "a0", "input": [[-1, 5]]}, 400, "input", "invalid_value"),
    ({"model": "a0", "input": [5] * 129}, 400, "input", "context_length_exceeded"),
    ({"model": "a0", "input": "w5", "dimensions": 8}, 400, "dimensions",
     "unsupported_parameter"),
    ({"model": "auto", "input": "w5"}, 400, "model", "invalid_model"),
    ({"model": "a0", "input": "w5", "encoding_format": "int8"}, 400, "encoding_format",
     "invalid_value"),
]


def test_bad_requests_get_openai_errors_and_the_server_goes_on(store):
    import httpx

    with live(store) as (url, _):
        client = _client(url)
        for body, status, param, code in BAD:
            r = httpx.post(f"{url}/v1/embeddings", json=body, timeout=30)
            assert r.status_code == status, (body, r.text)
            error = r.json()["error"]
            assert (error["param"], error["code"]) == (param, code), (body, error)
            assert error["message"] and error["type"]
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="t/nobody", input="w5")
        with pytest.raises(openai.BadRequestError, match="context"):
            client.embeddings.create(model="tiny", input=[[5] * 129])
        ok = client.embeddings.create(model="a0", input=[5] * 128, user="someone")
        assert len(ok.data) == 1 and ok.usage.prompt_tokens == 128


def test_engine_embed_checks_inputs_at_once(store):
    engine = make_engine(store)
    with pytest.raises(EmbeddingInputError, match="outside the vocabulary"):
        engine.embed([1, VOCAB], "a0")
    with pytest.raises(EmbeddingInputError, match="context"):
        engine.embed([[1] * 129], "a0")
    with pytest.raises(EmbeddingInputError, match="named adapter"):
        engine.embed("w5", "auto")
    from loratree.errors import AdapterNotFoundError
    with pytest.raises(AdapterNotFoundError):
        engine.embed("w5", "nobody").result()
    assert engine.embed(["w5 w6"], "t/u").result().vectors.shape == (1, 32)


def test_a_large_request_runs_over_iterations_beside_a_generation(store):
    """150 inputs take three loop iterations of at most STEP_ROWS each, the running
    generation decoding a token in each; the vectors equal PEFT's."""
    inputs = [[3 + i % 40, 9, 13 + i % 7] for i in range(150)]
    engine = make_engine(store)
    gen = engine.submit(Request([5, 9, 13, 3, 40], adapter="a1", max_new_tokens=30,
                                ignore_eos=True, logprobs=0))  # a record per token
    engine.step()  # prefilled: the generation is running
    before = len(gen.logprobs)
    future = engine.embed(inputs, "a0")  # no loop thread: steps until it is done
    assert len(gen.logprobs) - before == -(-len(inputs) // STEP_ROWS)  # 3 tokens meanwhile
    torch.testing.assert_close(future.result().vectors, peft_embedding(store, "a0", inputs),
                               atol=1e-4, rtol=0)
    assert future.result().prompt_tokens == 3 * len(inputs)
    while not gen.done:
        engine.step()
    solo = make_engine(store).generate(Request([5, 9, 13, 3, 40], adapter="a1",
                                               max_new_tokens=30, ignore_eos=True))
    assert gen.result().tokens == solo.tokens


def test_an_adapter_replaced_mid_request_gives_the_request_one_version(tmp_path):
    """The job holds its slot until its last input: a replace between iterations reaches
    the next request, never half of this one."""
    store = AdapterStore(tmp_path / "store")
    _save(store, tmp_path, "a0", QV, 100)
    inputs = [[3 + i % 40, 9, 13] for i in range(100)]
    old = peft_embedding(store, "a0", inputs)
    engine = make_engine(store)
    future = Future()
    engine.embeddings.put(EmbeddingJob(tuple(map(tuple, inputs)), "a0", future))
    engine.step()  # the first STEP_ROWS inputs, on the version added first
    assert not future.done()
    _save(store, tmp_path, "a0", QV, 200)  # replaced in the store
    while not future.done():
        engine.step()
    torch.testing.assert_close(future.result().vectors, old, atol=1e-4, rtol=0)
    after = engine.embed(inputs[:2], "a0").result().vectors
    torch.testing.assert_close(after, peft_embedding(store, "a0", inputs[:2]), atol=1e-4,
                               rtol=0)
    assert not torch.allclose(after, old[:2], atol=1e-3)
