"""The engine's per-request outputs without HTTP: log-probabilities of generated and prompt
tokens equal a log-softmax of PEFT's logits, and ``n`` choices share one prefill and equal
the same request alone with seeds seed + j, in mixed batches."""

import peft
import pytest
import torch

from loratree import surgery
from loratree.adapters import AdapterStore
from loratree.config import LoraConfig
from loratree.models.tiny import tiny_tokenizer
from loratree.ops.logprobs import token_logprobs
from loratree.serve import Engine, Request
from loratree.serve.slot_table import BASE, SlotTable
from loratree.tree.cache import AdapterCache
from tests.conftest import randomize_slot
from tests.serve.common import VOCAB, tiny_model

LORAS = {
    "qv": LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj")),
    "all": LoraConfig(rank=4, alpha=8, targets=("all-linear",)),
    "mlp": LoraConfig(rank=3, alpha=3, targets=("gate_proj", "down_proj")),
}
PROMPTS = [[5, 9, 13, 3, 40], [7, 7, 8], [30, 31, 32, 33, 34, 35, 36], [11, 50], [2, 4, 6, 8]]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = AdapterStore(tmp_path_factory.mktemp("store"))
    for i, (name, cfg) in enumerate(LORAS.items()):
        model = tiny_model()
        surgery.inject(model, cfg)
        randomize_slot(model, 0, std=0.3, seed=10 + i)
        store.save(name, model, 0)
    return store


def _engine(store, **kw):
    model = tiny_model()
    table = SlotTable(model, AdapterCache(store, 10**7), n_slots=4, max_rank=8)
    return Engine(model, tiny_tokenizer(VOCAB), table, **kw)


def peft_logprobs(store, name, seq):
    """log_softmax of PEFT's logits over ``seq`` (T, V) with ``name``'s adapter loaded in
    PEFT on a fresh tiny model (the base: no adapter)."""
    model = tiny_model()
    if name != BASE:
        model = peft.PeftModel.from_pretrained(model, store.path_of(name)).eval()
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].float(), -1)


def check_records(records, tokens, want_lp, k):
    """Each record's token, logprob and top-k against the reference rows ``want_lp``."""
    assert [r.token for r in records] == list(tokens)
    for r, row in zip(records, want_lp, strict=True):
        assert abs(r.logprob - float(row[r.token])) < 1e-4
        top = torch.topk(row, k)
        assert [t for t, _ in r.top] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in r.top]), top.values,
                                   atol=1e-4, rtol=0)


def test_token_logprobs_op_is_a_log_softmax_gather_and_topk():
    logits = torch.randn(4, 50, dtype=torch.bfloat16)
    tokens = torch.tensor([1, 7, 49, 0])
    chosen, values, ids = token_logprobs(logits, tokens, 3)
    lp = torch.log_softmax(logits.float(), -1)
    torch.testing.assert_close(chosen, lp[torch.arange(4), tokens])
    torch.testing.assert_close(values, lp.topk(3).values)
    assert torch.equal(ids, lp.topk(3).indices)
    empty = token_logprobs(logits[:0], tokens[:0], 2)
    assert [tuple(t.shape) for t in empty] == [(0,), (0, 2), (0, 2)]


def test_logprobs_and_prompt_logprobs_in_a_mixed_batch_equal_peft(store):
    engine = _engine(store)
    plan = [  # adapter, prompt, Request options
        ("qv", PROMPTS[0], {"logprobs": 3}),
        (BASE, PROMPTS[1], {}),
        ("all", PROMPTS[2], {"logprobs": 0, "prompt_logprobs": 2}),
        ("mlp", PROMPTS[3], {"logprobs": 5, "temperature": 0.8, "top_k": 5, "seed": 3}),
    ]
    late = [("qv", PROMPTS[4], {"prompt_logprobs": 1, "logprobs": 1, "max_new_tokens": 1}),
            (BASE, PROMPTS[0], {"logprobs": 2}),   # joins inside a packed step
            ("all", PROMPTS[3], {"prompt_logprobs": 4, "max_new_tokens": 0})]
    requests = [Request(p, adapter=a, ignore_eos=True, **{"max_new_tokens": 5, **o})
                for a, p, o in plan + late]
    handles = [h[0] for h in engine.submit_batch(requests[:4])]
    engine.step()
    engine.step()
    handles += [h[0] for h in engine.submit_batch(requests[4:])]
    while engine.busy():
        engine.step()
    assert engine.packed_joins >= 1
    for (name, prompt, _), req, h in zip(plan + late, requests, handles, strict=True):
        done = h.result()
        assert done.finish_reason == "length", done.error
        assert len(done.tokens) == req.max_new_tokens
        want = peft_logprobs(store, name, prompt + list(done.tokens))
        if req.logprobs is None:
            assert done.logprobs is None
        else:
            check_records(done.logprobs, done.tokens, want[len(prompt) - 1:-1], req.logprobs)
        if req.prompt_logprobs is None:
            assert done.prompt_logprobs is None
        else:
            assert done.prompt_logprobs[0] is None and len(done.prompt_logprobs) == len(prompt)
            check_records(done.prompt_logprobs[1:], prompt[1:], want[:len(prompt) - 1],
                          req.prompt_logprobs)


def test_n_choices_share_one_prefill_and_equal_seeds_run_alone(store):
    engine = _engine(store)
    sizes = []
    prefill = engine.runner.prefill
    engine.runner.prefill = lambda group: sizes.append(len(group)) or prefill(group)
    sampled = dict(max_new_tokens=6, temperature=1.0, top_p=0.95, seed=41, ignore_eos=True)
    req = Request(PROMPTS[0], adapter="qv", n=3, logprobs=1, **sampled)
    others = [Request(PROMPTS[1], adapter="all", max_new_tokens=4),
              Request(PROMPTS[2], adapter=BASE, n=2, temperature=0.7, seed=7,
                      max_new_tokens=5)]
    groups = engine.submit_batch([req, *others])
    while engine.busy():
        engine.step()
    assert sizes == [3]  # three requests in one forward, seven rows after it
    choices = [h.result() for h in groups[0]]
    assert len({c.tokens for c in choices}) > 1  # the seeds differ
    for j, got in enumerate(choices):
        alone = _engine(store).generate(Request(PROMPTS[0], adapter="qv", logprobs=1,
                                                **{**sampled, "seed": 41 + j}))
        assert got.tokens == alone.tokens and got.text == alone.text
        assert [r.logprob for r in got.logprobs] == pytest.approx(
            [r.logprob for r in alone.logprobs], abs=1e-5)
    for j, h in enumerate(groups[2]):
        alone = _engine(store).generate(Request(PROMPTS[2], adapter=BASE, temperature=0.7,
                                                seed=7 + j, max_new_tokens=5))
        assert h.result().tokens == alone.tokens


def test_bad_output_settings_are_refused_by_name(store):
    for bad, name in [({"logprobs": 21}, "logprobs"), ({"prompt_logprobs": -1},
                                                      "prompt_logprobs"),
                      ({"n": 0}, "n"), ({"max_new_tokens": 0}, "max_new_tokens")]:
        with pytest.raises(ValueError, match=name):
            Request([1, 2], **bad)
    engine = _engine(store, max_batch=4)
    with pytest.raises(ValueError, match="n = 5"):
        engine.submit_choices(Request([1, 2], n=5))
    with pytest.raises(ValueError, match="submit_choices"):
        engine.submit(Request([1, 2], n=2))


def test_logprobs_of_rows_run_merged_equal_peft(store):
    engine = _engine(store, merge_min_tokens=2)
    handles = engine.submit_batch([Request(p, adapter="all", max_new_tokens=4, logprobs=2,
                                           ignore_eos=True, n=2, seed=1, temperature=0.5)
                                   for p in PROMPTS[:2]])
    while engine.busy():
        engine.step()
    assert engine.modes["merged"] > 0
    for p, group in zip(PROMPTS, handles, strict=False):
        for h in group:
            done = h.result()
            want = peft_logprobs(store, "all", p + list(done.tokens))
            check_records(done.logprobs, done.tokens, want[len(p) - 1:-1], 2)
