"""Packed joins: a request joining a running batch is prefilled inside its decode step,
and every request still gets the tokens and logits it gets alone."""

import pytest
import torch

from loratree import surgery
from loratree.adapters import AdapterStore, load_adapter
from loratree.config import LoraConfig
from loratree.models.tiny import tiny_gpt2, tiny_tokenizer
from loratree.serve import Engine, Request
from loratree.serve.kv import BatchKV
from loratree.serve.packed import pack, supports_packing
from loratree.serve.slot_table import BASE, SlotTable
from loratree.tree.cache import AdapterCache
from tests.conftest import keep_logits, randomize_slot
from tests.serve.common import VOCAB, run_plan, solo_reference, tiny_model
from tests.serve.test_engine import PROMPTS, _engine, store  # noqa: F401 (fixture)


def test_joiners_packed_into_decode_steps_equal_each_request_alone(store):  # noqa: F811
    engine = _engine(store)
    kept = keep_logits(engine)
    assert engine.packs
    plan = [("qv-r2", PROMPTS[0], 9, 0), ("all-r4", PROMPTS[1], 6, 2),
            (BASE, PROMPTS[2], 5, 2),     # two join one step together
            ("qv-r2", PROMPTS[3], 4, 4), ("all-r4", PROMPTS[0], 3, 5),
            ("prefix", PROMPTS[1], 4, 5)]  # a prefix adapter joins through its own prefill
    handles = run_plan(engine, plan)
    assert engine.packed_joins == 4
    for (name, prompt, n, _), h in zip(plan, handles, strict=True):
        done = h.result()
        assert done.finish_reason == "length", done.error
        tokens, logits = solo_reference(store, name, prompt, n)
        assert list(done.tokens) == tokens, name
        torch.testing.assert_close(torch.stack(kept[h]), torch.stack(logits), atol=1e-4,
                                   rtol=0)
    assert all(s.users == 0 for s in engine.table._slots)


def test_packed_joins_on_one_merged_adapter_and_with_eager_attention(store):  # noqa: F811
    engine = _engine(store, merge_min_tokens=2)
    kept = keep_logits(engine)
    engine.model.config._attn_implementation = "eager"
    engine.runner.mask_dtype = torch.float32  # what an eager model gets at construction
    plan = [("all-r4", PROMPTS[0], 8, 0), ("all-r4", PROMPTS[1], 5, 1),
            ("all-r4", PROMPTS[2], 4, 3)]
    handles = run_plan(engine, plan)
    assert engine.packed_joins == 2 and engine.modes["merged"] > 0
    for (name, prompt, n, _), h in zip(plan, handles, strict=True):
        tokens, logits = solo_reference(store, name, prompt, n)
        assert list(h.result().tokens) == tokens
        torch.testing.assert_close(torch.stack(kept[h]), torch.stack(logits), atol=1e-4,
                                   rtol=0)


def test_packed_joins_on_gpt2_equal_each_request_alone(tmp_path):
    def model():
        torch.manual_seed(0)
        m = tiny_gpt2(vocab=VOCAB)
        m.generation_config.eos_token_id = None
        return m.eval()

    gpt_store = AdapterStore(tmp_path / "gpt_store")
    lora = model()
    surgery.inject(lora, LoraConfig(rank=2, alpha=4, targets=("c_attn",)))
    randomize_slot(lora, 0, std=0.3, seed=1)
    gpt_store.save("attn", lora, 0)
    m = model()
    assert supports_packing(m)
    engine = Engine(m, tiny_tokenizer(VOCAB), SlotTable(m, AdapterCache(gpt_store, 10**7)))
    kept = keep_logits(engine)
    plan = [("attn", PROMPTS[0], 6, 0), (BASE, PROMPTS[1], 4, 1), ("attn", PROMPTS[2], 3, 2)]
    handles = run_plan(engine, plan)
    assert engine.packed_joins == 2
    for (name, prompt, n, _), h in zip(plan, handles, strict=True):
        ref = model()
        if name != BASE:
            load_adapter(ref, gpt_store.path_of(name))
        ids = list(prompt)
        with torch.no_grad():
            for i in range(n):
                want = ref(input_ids=torch.tensor([ids])).logits[0, -1]
                torch.testing.assert_close(kept[h][i], want, atol=1e-4, rtol=0)
                ids.append(int(want.argmax()))
        assert list(h.result().tokens) == ids[len(prompt):]


def test_a_failing_packed_step_fails_its_joiners_and_frees_their_slots(store):  # noqa: F811
    engine = _engine(store)
    first = engine.submit(Request(PROMPTS[0], adapter="qv-r2", max_new_tokens=6))
    engine.step()
    joiner = engine.submit(Request(PROMPTS[1], adapter="all-r4", max_new_tokens=4))
    forward = engine.model.forward

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    engine.model.forward = broken
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()
    engine.model.forward = forward
    assert joiner.result().finish_reason == "error" and "device lost" in joiner.result().error
    assert engine.table._slot(engine.table.slot_of("all-r4")).users == 0
    engine._fail_running(RuntimeError("device lost"))  # what the loop does next
    assert first.result().finish_reason == "error" and not engine.busy()
    later = engine.submit(Request(PROMPTS[2], adapter="all-r4", max_new_tokens=3))
    while engine.busy():
        engine.step()
    assert list(later.result().tokens) == solo_reference(store, "all-r4", PROMPTS[2], 3)[0]


def test_pack_rejects_mismatched_rows_and_empty_prompts():
    kv = BatchKV([torch.zeros(2, 1, 3, 4)], [torch.zeros(2, 1, 3, 4)],
                 torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="2 running rows"):
        pack(kv, [1], [3], [[1, 2]])
    with pytest.raises(ValueError, match="joining prompt"):
        pack(kv, [1, 2], [3, 3], [[]])


def test_models_without_what_packing_needs_are_not_packed():
    m = tiny_model()
    assert supports_packing(m)
    m.config.sliding_window, m.config.use_sliding_window = 4, True
    assert supports_packing(m)  # every layer slides: one windowed mask (tests/serve/test_sliding)
    m.config.sliding_window = None
    m.config._attn_implementation = "flex_attention"
    assert not supports_packing(m)


def test_prompts_past_the_packing_budget_prefill_on_their_own(store, monkeypatch):  # noqa: F811
    import loratree.serve.scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "PACK_TOKENS", 6)
    engine = _engine(store)
    plan = [("qv-r2", PROMPTS[0], 8, 0),
            ("all-r4", PROMPTS[0], 4, 1), (BASE, PROMPTS[2], 4, 1),  # 5 packed; 7 > 6 alone
            ("qv-r2", PROMPTS[1], 3, 3), ("all-r4", PROMPTS[3], 3, 3)]  # 3 packed; 3+2 <= 6
    handles = run_plan(engine, plan)
    assert engine.packed_joins == 3
    for (name, prompt, n, _), h in zip(plan, handles, strict=True):
        assert list(h.result().tokens) == solo_reference(store, name, prompt, n)[0], name
