"""The engine: a continuously batched mix of adapters equals each request alone (and PEFT),
with sampling, stop strings, streaming, cancellation and bad requests handled."""

import peft
import pytest
import torch

from loratree import surgery
from loratree.adapters import AdapterStore, load_adapter
from loratree.config import LoraConfig, PrefixConfig
from loratree.errors import NonFiniteError
from loratree.models.tiny import tiny_tokenizer
from loratree.serve import Engine, Request
from loratree.serve.cpu import CpuTuning
from loratree.serve.slot_table import BASE, SlotTable
from loratree.tree.cache import AdapterCache
from tests.conftest import keep_logits, randomize_slot
from tests.serve.common import VOCAB, solo_reference, tiny_model

LORAS = {
    "qv-r2": LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj")),
    "all-r4": LoraConfig(rank=4, alpha=8, targets=("all-linear",)),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = AdapterStore(tmp_path_factory.mktemp("store"))
    for i, (name, cfg) in enumerate(LORAS.items()):
        model = tiny_model()
        surgery.inject(model, cfg)
        randomize_slot(model, 0, std=0.3, seed=i)
        store.save(name, model, 0)
    model = tiny_model()
    geo = surgery.geometry(model)
    g = torch.Generator().manual_seed(5)
    surgery.add_prefix(model, PrefixConfig(n_virtual=3), vectors=torch.randn(3, geo.width,
                                                                             generator=g))
    store.save("prefix", model, 0)
    return store


def _engine(store, **kw):
    model = tiny_model()
    table = SlotTable(model, AdapterCache(store, 10**7), n_slots=4, max_rank=8)
    return Engine(model, tiny_tokenizer(VOCAB), table, **kw)


PROMPTS = [[5, 9, 13, 2 + 1, 40], [7, 7, 8], [30, 31, 32, 33, 34, 35, 36], [11, 50]]


def test_continuous_batch_of_mixed_adapters_equals_each_alone(store):
    engine = _engine(store)
    kept = keep_logits(engine)
    plan = [("qv-r2", PROMPTS[0], 8), ("prefix", PROMPTS[1], 4), (BASE, PROMPTS[2], 9),
            ("all-r4", PROMPTS[3], 6), ("prefix", PROMPTS[3], 5), ("qv-r2", PROMPTS[1], 3)]
    handles = [engine.submit(Request(p, adapter=a, max_new_tokens=n)) for a, p, n in plan[:2]]
    for _ in range(2):
        engine.step()
    handles += [engine.submit(Request(p, adapter=a, max_new_tokens=n)) for a, p, n in plan[2:4]]
    for _ in range(3):
        engine.step()               # the prefix request leaves while others run on
    handles += [engine.submit(Request(p, adapter=a, max_new_tokens=n)) for a, p, n in plan[4:]]
    while engine.busy():
        engine.step()
    for (name, prompt, n), h in zip(plan, handles, strict=True):
        done = h.result()
        tokens, logits = solo_reference(store, name, prompt, n)
        assert list(done.tokens) == tokens, name
        assert done.finish_reason == "length"
        torch.testing.assert_close(torch.stack(kept[h]), torch.stack(logits), atol=1e-4,
                                   rtol=0)
    assert engine.modes["unmerged"] > 0
    assert engine.table.cache.stats.misses == 3
    # the LoRA and base rows against PEFT's mixed-batch inference on their full sequences
    theirs = _peft(store)
    lora_rows = [(a, p, h) for (a, p, _), h in zip(plan, handles, strict=True) if a != "prefix"]
    seqs = [p + list(h.result().tokens) for _, p, h in lora_rows]
    width = max(len(q) for q in seqs)
    ids = torch.tensor([q + [0] * (width - len(q)) for q in seqs])
    mask = (torch.arange(width)[None] < torch.tensor([len(q) for q in seqs])[:, None]).long()
    with torch.no_grad():
        logits = theirs(input_ids=ids, attention_mask=mask,
                        adapter_names=[a for a, _, _ in lora_rows]).logits
    for i, (_, p, h) in enumerate(lora_rows):
        got = torch.stack(kept[h])
        torch.testing.assert_close(got, logits[i, len(p) - 1:len(p) - 1 + len(got)],
                                   atol=1e-4, rtol=0)


def _peft(store):
    theirs = peft.PeftModel.from_pretrained(tiny_model(), store.path_of("qv-r2"),
                                            adapter_name="qv-r2")
    theirs.load_adapter(store.path_of("all-r4"), adapter_name="all-r4")
    return theirs.eval()


def test_lora_rows_match_peft_mixed_batch_inference(store):
    engine = _engine(store)
    kept = keep_logits(engine)
    names = ["qv-r2", "all-r4", "qv-r2"]
    handles = [engine.submit(Request(PROMPTS[i], adapter=n, max_new_tokens=4))
               for i, n in enumerate(names)]
    while engine.busy():
        engine.step()
    theirs = _peft(store)
    seqs = [PROMPTS[i] + list(h.result().tokens) for i, h in enumerate(handles)]
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])  # right padding
    mask = (torch.arange(width)[None] < torch.tensor([len(s) for s in seqs])[:, None]).long()
    with torch.no_grad():
        logits = theirs(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    for i, h in enumerate(handles):
        n = len(PROMPTS[i])
        want = logits[i, n - 1:n - 1 + 4]
        torch.testing.assert_close(torch.stack(kept[h]), want, atol=1e-4, rtol=0)


def test_one_adapter_batch_runs_merged_with_the_same_tokens(store):
    engine = _engine(store, merge_min_tokens=4)
    handles = [engine.submit(Request(p, adapter="all-r4", max_new_tokens=6)) for p in PROMPTS]
    while engine.busy():
        engine.step()
    assert engine.modes["merged"] > 0
    for p, h in zip(PROMPTS, handles, strict=True):
        tokens, _ = solo_reference(store, "all-r4", p, 6)
        assert list(h.result().tokens) == tokens


def test_sampling_is_reproducible_per_request_whatever_the_batch(store):
    def run(batch_with_others):
        engine = _engine(store)
        req = Request(PROMPTS[0], adapter="qv-r2", max_new_tokens=8, temperature=1.0,
                      top_k=20, top_p=0.9, seed=123)
        others = [Request(p, adapter="prefix", max_new_tokens=8, temperature=0.7, seed=i)
                  for i, p in enumerate(PROMPTS)] if batch_with_others else []
        handles = [engine.submit(r) for r in [*others[:2], req, *others[2:]]]
        while engine.busy():
            engine.step()
        return handles[2 if batch_with_others else 0].result().tokens

    assert run(False) == run(True)


def test_stop_strings_streaming_cancel_and_errors(store):
    engine = _engine(store)
    tokens, _ = solo_reference(store, "qv-r2", PROMPTS[0], 8)
    words = [f"w{t}" for t in tokens]
    stop = words[3]
    h_stop = engine.submit(Request(PROMPTS[0], adapter="qv-r2", max_new_tokens=8, stop=(stop,)))
    h_cancel = engine.submit(Request(PROMPTS[1], adapter="prefix", max_new_tokens=50))
    h_bad = engine.submit(Request(PROMPTS[2], adapter="no-such-adapter"))
    h_rank = engine.submit(Request(PROMPTS[2], adapter="../etc"))
    engine.step()
    h_cancel.cancel()
    while engine.busy():
        engine.step()
    done = h_stop.result()
    full = " ".join(words)
    assert done.finish_reason == "stop" and done.text == full[:full.find(stop)]
    assert "".join(h_stop) == done.text
    assert h_cancel.result().finish_reason == "cancelled"
    bad = h_bad.result()
    assert bad.finish_reason == "error" and "no-such-adapter" in bad.error
    assert h_rank.result().finish_reason == "error" and "AdapterNameError" in h_rank.result().error
    assert engine.table.active() and all(s.users == 0 for s in engine.table._slots)


def test_end_of_sequence_stops_a_request_unless_it_ignores_eos(store):
    tokens, _ = solo_reference(store, "qv-r2", PROMPTS[0], 8)
    engine = _engine(store)
    engine.scheduler.eos = {tokens[2]}
    stopped = engine.submit(Request(PROMPTS[0], adapter="qv-r2", max_new_tokens=8))
    kept = engine.submit(Request(PROMPTS[0], adapter="qv-r2", max_new_tokens=8, ignore_eos=True))
    while engine.busy():
        engine.step()
    cut = tokens.index(tokens[2]) + 1
    assert stopped.result().finish_reason == "stop"
    assert list(stopped.result().tokens) == tokens[:cut]
    assert kept.result().finish_reason == "length" and list(kept.result().tokens) == tokens


@pytest.mark.parametrize("tuning", [None, CpuTuning()], ids=["untuned", "cpu-tuned"])
def test_threaded_engine_streams(store, tuning):
    """In its own thread (with or without CPU tuning) the engine streams, and a mixed batch
    gives each request the tokens and logits it gets alone."""
    engine = _engine(store, cpu_tuning=tuning)
    kept = keep_logits(engine)
    engine.start()
    try:
        h = engine.submit(Request(PROMPTS[3], adapter="all-r4", max_new_tokens=5))
        text = "".join(h)
        assert text == h.result(timeout=30).text and len(h.result().tokens) == 5
        names = ["qv-r2", "all-r4", BASE, "qv-r2"]
        handles = [engine.submit(Request(p, adapter=a, max_new_tokens=6))
                   for p, a in zip(PROMPTS, names, strict=True)]
        for handle, prompt, name in zip(handles, PROMPTS, names, strict=True):
            tokens, logits = solo_reference(store, name, prompt, 6)
            assert list(handle.result(timeout=60).tokens) == tokens
            torch.testing.assert_close(torch.stack(kept[handle]), torch.stack(logits),
                                       atol=1e-4, rtol=0)
    finally:
        engine.close()


def test_auto_routes_to_the_adapter_whose_prompts_resemble_the_request(store, tmp_path):
    import random
    import shutil

    from loratree.adapters.routing_files import write_centroid
    from loratree.serve.router import Router
    from loratree.surgery.features import prompt_features

    rng = random.Random(0)

    def prompts(lo, hi, n):
        return [[rng.randint(lo, hi) for _ in range(rng.randint(3, 8))] for _ in range(n)]

    model = tiny_model()
    routed = AdapterStore(tmp_path / "routed")
    # two "tasks" with their own small vocabularies (a random model's features cannot
    # tell wide random token ranges apart; the demo tasks are measured in bench)
    for name, (lo, hi) in {"low": (3, 8), "high": (50, 55)}.items():
        source = tmp_path / name  # the centroid is written before the add, as train does
        shutil.copytree(store.path_of("qv-r2" if name == "low" else "all-r4"), source)
        write_centroid(source, prompt_features(model, prompts(lo, hi, 40)))
        routed.add(name, source)
    router = Router(routed, model)
    held_out = [("low", p) for p in prompts(3, 8, 20)] + [("high", p) for p in prompts(50, 55, 20)]
    hits = sum(router.route(p).adapter == want for want, p in held_out)
    assert hits / len(held_out) >= 0.9

    table = SlotTable(model, AdapterCache(routed, 10**7), n_slots=2, max_rank=8)
    engine = Engine(model, tiny_tokenizer(VOCAB), table)
    done = engine.generate(Request(held_out[0][1], adapter="auto", max_new_tokens=3))
    assert done.adapter == "low" and len(done.tokens) == 3


def test_an_adapter_with_non_finite_logits_fails_only_its_own_requests(store, tmp_path):
    model = tiny_model()
    surgery.inject(model, LORAS["qv-r2"])
    randomize_slot(model, 0, std=0.3, seed=9)
    for m in surgery.lora_layers(model).values():
        with torch.no_grad():
            m.lora_b[0].fill_(3e38)  # finite weights whose output overflows to inf
    bad_store = AdapterStore(tmp_path)
    for name in LORAS:
        bad_store.save(name, *_copy_of(store, name))
    bad_store.save("overflow", model, 0)
    table = SlotTable(tiny_model(), AdapterCache(bad_store, 10**7), n_slots=4, max_rank=8)
    engine = Engine(table.model, tiny_tokenizer(VOCAB), table)
    bad = engine.submit(Request(PROMPTS[0], adapter="overflow", max_new_tokens=5))
    good = [engine.submit(Request(p, adapter="qv-r2", max_new_tokens=5)) for p in PROMPTS[:2]]
    while engine.busy():
        engine.step()
    failed = bad.result()
    assert failed.finish_reason == "error" and isinstance(failed.exception, NonFiniteError)
    assert "overflow" in failed.error
    for p, h in zip(PROMPTS, good, strict=False):
        assert list(h.result().tokens) == solo_reference(store, "qv-r2", p, 5)[0]


def test_a_failing_step_fails_running_requests_and_the_loop_goes_on(store):
    engine = _engine(store)
    forward = engine.model.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device lost")
        return forward(*args, **kwargs)

    engine.model.forward = flaky
    engine.start()
    try:
        first = [engine.submit(Request(p, adapter="qv-r2", max_new_tokens=6)) for p in PROMPTS[:2]]
        results = [h.result(timeout=30) for h in first]
        assert any(r.finish_reason == "error" and "device lost" in r.error for r in results)
        assert engine.faults == 1 and engine.last_error == "RuntimeError: device lost"
        later = engine.submit(Request(PROMPTS[2], adapter="qv-r2", max_new_tokens=4))
        assert later.result(timeout=30).tokens == tuple(solo_reference(store, "qv-r2", PROMPTS[2],
                                                                   4)[0])
        assert engine.consecutive_failures == 0 and engine.alive
        assert all(s.users == 0 for s in engine.table._slots)
    finally:
        engine.close()


def _copy_of(store, name):
    model = tiny_model()
    slot = load_adapter(model, store.path_of(name))
    return model, slot


def test_requests_wait_for_a_slot_when_every_slot_is_busy(store):
    """2 slots and a cache with room for exactly 2 adapters: a third adapter's request
    waits until a running one ends, then switches in; nothing fails."""
    sizes = {n: store.info(n).size for n in ("qv-r2", "all-r4", "prefix")}
    model = tiny_model()
    cache = AdapterCache(store, 2 * max(sizes.values()))
    table = SlotTable(model, cache, n_slots=2, max_rank=8)
    engine = Engine(model, tiny_tokenizer(VOCAB), table, max_batch=4)
    plan = [("qv-r2", PROMPTS[0], 6), ("all-r4", PROMPTS[1], 3), ("prefix", PROMPTS[2], 4),
            ("qv-r2", PROMPTS[3], 2)]
    handles = [engine.submit(Request(p, adapter=a, max_new_tokens=n)) for a, p, n in plan]
    while engine.busy():
        engine.step()
    for (a, p, n), h in zip(plan, handles, strict=True):
        assert h.result().finish_reason == "length", h.result().error
        assert list(h.result().tokens) == solo_reference(store, a, p, n)[0]
    assert cache.stats.bytes <= cache.budget


def test_a_lone_joiner_waits_for_company_up_to_join_wait_prefills(store):
    """Without packed joins: while rows run, a request that would join alone waits
    (``join_wait`` prefill times) for others, then they join in one prefill;
    ``join_wait=0`` joins at once. Each still gets its solo tokens."""
    for wait, joined_alone in ((1e9, False), (0.0, True)):
        engine = _engine(store, max_batch=3, join_wait=wait, pack_joins=False)
        first = engine.submit(Request(PROMPTS[0], adapter="qv-r2", max_new_tokens=8))
        engine.step()  # prefills the first request: the batch now runs
        second = engine.submit(Request(PROMPTS[1], adapter="all-r4", max_new_tokens=6))
        engine.step()
        assert (len(engine.scheduler.rows) == 2) is joined_alone
        third = engine.submit(Request(PROMPTS[2], adapter=BASE, max_new_tokens=6))
        engine.step()  # two waiting fill the two free rows: they join together
        assert len(engine.scheduler.rows) == 3
        while engine.busy():
            engine.step()
        for h, p, name in ((first, PROMPTS[0], "qv-r2"), (second, PROMPTS[1], "all-r4"),
                           (third, PROMPTS[2], BASE)):
            tokens, _ = solo_reference(store, name, p, h.request.max_new_tokens)
            assert list(h.result().tokens) == tokens


def test_a_mixed_decode_step_runs_the_grouped_plan(store, monkeypatch):
    """Once both requests decode, each step runs every LoRA layer as one batched matmul
    pair (``Grouped``), never the per-slot gather: a fallback fails here, not only in
    the benchmark."""
    from loratree.ops import plan as plans

    chosen = []
    real = plans.choose_plan
    monkeypatch.setattr(plans, "choose_plan",
                        lambda *a, **k: chosen.append(real(*a, **k)) or chosen[-1])
    engine = _engine(store)
    for name, prompt in (("qv-r2", PROMPTS[0]), ("all-r4", PROMPTS[3])):
        engine.submit(Request(prompt, adapter=name, max_new_tokens=6))
    for _ in range(3):  # prefill, then decode
        engine.step()
    chosen.clear()
    engine.step()
    assert chosen and all(isinstance(p, plans.Grouped) for p in chosen), chosen


def test_the_static_baseline_admits_only_into_an_empty_batch(store):
    """``Engine.static_baseline`` (the benchmarks' baseline): a request waits while the
    batch runs, then gets its solo tokens; the public constructor has no such option."""
    model = tiny_model()
    table = SlotTable(model, AdapterCache(store, 10**7), n_slots=4, max_rank=8)
    engine = Engine.static_baseline(model, tiny_tokenizer(VOCAB), table, max_batch=4)
    first = engine.submit(Request(PROMPTS[0], adapter="qv-r2", max_new_tokens=5))
    engine.step()
    later = engine.submit(Request(PROMPTS[1], adapter="all-r4", max_new_tokens=2))
    engine.step()
    assert engine.load() == (1, 1)  # the batch has room, but it is running
    while engine.busy():
        engine.step()
    for h, prompt, name, n in ((first, PROMPTS[0], "qv-r2", 5), (later, PROMPTS[1], "all-r4", 2)):
        assert list(h.result().tokens) == solo_reference(store, name, prompt, n)[0]
    with pytest.raises(TypeError):
        Engine(model, tiny_tokenizer(VOCAB), table, static=True)
