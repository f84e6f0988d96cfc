"""Serving ``modules_to_save``: a PEFT-made adapter with its own ``lm_head`` in the engine's
continuous batches, with plain LoRA and DoRA adapters and the base, including requests that
join a running batch through the packed step (the copied head sees only the kept
positions); every request's logits equal PEFT's for that adapter alone."""

import peft
import pytest
import torch

from loratree.adapters import AdapterStore
from loratree.models.tiny import tiny_tokenizer
from loratree.serve import Engine
from loratree.serve.slot_table import BASE, SlotTable
from loratree.tree.cache import AdapterCache
from tests.conftest import keep_logits
from tests.serve.common import VOCAB, run_plan, tiny_model

ADAPTERS = {  # name: PEFT LoraConfig fields
    "head": {"target_modules": ["q_proj"], "r": 2, "lora_alpha": 4,
             "modules_to_save": ["lm_head"]},
    "lora-qv": {"target_modules": ["q_proj", "v_proj"], "r": 2, "lora_alpha": 4},
    "dora-mlp": {"target_modules": ["gate_proj", "down_proj"], "r": 4, "lora_alpha": 8,
                 "use_dora": True},
}
PROMPTS = [[5, 9, 13, 3, 40], [7, 7, 8], [30, 31, 32, 33, 34, 35, 36], [11, 50], [20, 21]]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The store, and PEFT's model per adapter (the reference)."""
    root = tmp_path_factory.mktemp("copy-serve")
    store = AdapterStore(root / "store")
    theirs = {}
    for i, (name, fields) in enumerate(ADAPTERS.items()):
        model = peft.get_peft_model(tiny_model(), peft.LoraConfig(task_type="CAUSAL_LM",
                                                                  **fields))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad and "lora_magnitude_vector" in n:
                    p.mul_(0.5 + torch.rand(p.shape, generator=g))
                elif p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
        model.save_pretrained(root / name)
        store.add(name, root / name)
        theirs[name] = model.eval()
    theirs[BASE] = tiny_model().eval()
    return store, theirs


def test_copy_rows_joining_packed_steps_equal_peft_alone(made):
    store, theirs = made
    model = tiny_model()
    table = SlotTable(model, AdapterCache(store, 10**7), n_slots=4, max_rank=8)
    engine = Engine(model, tiny_tokenizer(VOCAB), table)
    kept = keep_logits(engine)
    assert engine.packs
    plan = [("lora-qv", PROMPTS[0], 8, 0), (BASE, PROMPTS[1], 7, 0),
            ("head", PROMPTS[2], 5, 2),  # the copy row joins a running batch
            ("dora-mlp", PROMPTS[3], 5, 2), ("head", PROMPTS[4], 3, 4)]
    handles = run_plan(engine, plan)
    assert engine.packed_joins == 3  # all three joiners, both copy rows among them
    outputs = []
    for (name, prompt, _, _), h in zip(plan, handles, strict=True):
        done = h.result()
        assert done.finish_reason == "length", (name, done.error)
        seq = torch.tensor([prompt + list(done.tokens)])
        with torch.no_grad():
            want = theirs[name](input_ids=seq).logits[0, len(prompt) - 1:-1]
        got = torch.stack(kept[h])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=name)
        outputs.append(got)
    with torch.no_grad():  # the copied head makes a visible difference
        plain = theirs[BASE](input_ids=torch.tensor([PROMPTS[2]])).logits[0, -1]
    assert (outputs[2][0] - plain).abs().max() > 1e-2
