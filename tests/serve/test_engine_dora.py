"""Serving DoRA: PEFT-made DoRA adapters in the engine's continuous batches, with plain LoRA
adapters and the base, every request's logits equal to PEFT's for that adapter alone."""

import peft
import pytest
import torch

from loratree.adapters import AdapterStore
from loratree.models.tiny import tiny_tokenizer
from loratree.serve import Engine, Request
from loratree.serve.slot_table import BASE, SlotTable
from loratree.tree.cache import AdapterCache
from tests.conftest import keep_logits
from tests.serve.common import VOCAB, tiny_model

ADAPTERS = {  # name: (targets, r, alpha, use_dora)
    "dora-qv": (["q_proj", "v_proj"], 4, 8, True),
    "dora-mlp": (["gate_proj", "up_proj", "down_proj"], 2, 4, True),
    "lora-qv": (["q_proj", "v_proj"], 2, 4, False),
    "lora-all": (["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], 8, 8, False),
}
PROMPTS = [[5, 9, 13, 3, 40], [7, 7, 8], [30, 31, 32, 33, 34, 35, 36], [11, 50], [20, 21]]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The store, and PEFT's model per adapter (the reference)."""
    root = tmp_path_factory.mktemp("dora-serve")
    store = AdapterStore(root / "store")
    theirs = {}
    for i, (name, (targets, r, alpha, dora)) in enumerate(ADAPTERS.items()):
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_dora=dora,
                              task_type="CAUSAL_LM")
        model = peft.get_peft_model(tiny_model(), cfg)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_A" in n or "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                elif "lora_magnitude_vector" in n:
                    p.mul_(0.5 + torch.rand(p.shape, generator=g))
        model.save_pretrained(root / name)
        store.add(name, root / name)
        theirs[name] = model.eval()
    theirs[BASE] = tiny_model().eval()
    return store, theirs


def _submit(engine, adapter, prompt, n):
    return engine.submit(Request(prompt, adapter=adapter, max_new_tokens=n, ignore_eos=True))


def _check(handles, plan, theirs, kept):
    for (name, prompt, _), h in zip(plan, handles, strict=True):
        done = h.result()
        assert done.finish_reason == "length", (name, done.error)
        seq = torch.tensor([prompt + list(done.tokens)])
        with torch.no_grad():
            want = theirs[name](input_ids=seq).logits[0, len(prompt) - 1:-1]
        torch.testing.assert_close(torch.stack(kept[h]), want, atol=1e-4, rtol=0, msg=name)


def test_mixed_decode_of_dora_lora_and_base_equals_peft_alone(made):
    store, theirs = made
    model = tiny_model()
    table = SlotTable(model, AdapterCache(store, 10**7), n_slots=4, max_rank=8)
    engine = Engine(model, tiny_tokenizer(VOCAB), table)
    kept = keep_logits(engine)
    plan = [("dora-qv", PROMPTS[0], 6), ("lora-qv", PROMPTS[1], 5), (BASE, PROMPTS[2], 4),
            ("dora-mlp", PROMPTS[3], 7), ("lora-all", PROMPTS[4], 5), ("dora-qv", PROMPTS[1], 3)]
    handles = [_submit(engine, a, p, n) for a, p, n in plan[:3]]
    engine.step()
    handles += [_submit(engine, a, p, n) for a, p, n in plan[3:]]
    while engine.busy():
        engine.step()
    _check(handles, plan, theirs, kept)
    assert engine.modes["unmerged"] > 0


def test_one_dora_adapter_batch_runs_merged_with_peft_logits(made):
    store, theirs = made
    model = tiny_model()
    table = SlotTable(model, AdapterCache(store, 10**7), n_slots=2, max_rank=8)
    engine = Engine(model, tiny_tokenizer(VOCAB), table, merge_min_tokens=4)
    kept = keep_logits(engine)
    plan = [("dora-mlp", p, 6) for p in PROMPTS[:3]]
    handles = [_submit(engine, a, p, n) for a, p, n in plan]
    while engine.busy():
        engine.step()
    assert engine.modes["merged"] > 0
    _check(handles, plan, theirs, kept)
    plan = [("dora-qv", PROMPTS[0], 4), ("dora-mlp", PROMPTS[1], 4)]  # leaves merged mode
    handles = [_submit(engine, a, p, n) for a, p, n in plan]
    while engine.busy():
        engine.step()
    _check(handles, plan, theirs, kept)
