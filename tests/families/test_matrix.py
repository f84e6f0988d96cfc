"""The family matrix: every popular decoder family (tiny random models built from
transformers' configs) through the same checks, each against its reference:

- a PEFT-made LoRA adapter (all-linear) loads here with PEFT's logits, and ours loads in
  PEFT with ours;
- merge gives the unmerged logits and unmerge gives the base weights back;
- the training loss of the first step equals transformers' own loss (``labels=``);
- concurrent mixed serving (LoRA of two ranks, a prefix adapter, the base) equals PEFT's
  solo outputs.

The fused-MoE family (Qwen3-MoE) has its own file, tests/adapters/test_moe.py.
"""

import peft
import pytest
import torch

from loratree import surgery
from loratree.adapters import load_adapter, save_adapter
from loratree.config import LoraConfig
from loratree.models.chat import IGNORE_INDEX
from loratree.models.families import FAMILIES, VOCAB
from loratree.models.tiny import random_tokens, tiny_tokenizer
from loratree.serve import Engine, Request
from loratree.serve.slot_table import BASE, SlotTable
from loratree.train.steps import loss_sum
from loratree.tree.cache import AdapterCache
from tests.conftest import randomize_slot
from tests.families.common import PeftReference, family_store, scaled

ALL_R4 = LoraConfig(rank=4, alpha=8, targets=("all-linear",))
IDS = random_tokens(VOCAB, 2, 11, seed=3)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_peft_files_both_ways_merge_and_unmerge(family, tmp_path):
    theirs = peft.get_peft_model(scaled(family), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    theirs.save_pretrained(tmp_path / "peft")
    ours = scaled(family)
    load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(_logits(ours), _logits(theirs.eval()), atol=1e-4, rtol=0)

    mine = scaled(family)
    surgery.inject(mine, ALL_R4)
    randomize_slot(mine, 0, std=0.2, seed=2)
    save_adapter(mine, tmp_path / "ours", 0)
    back = peft.PeftModel.from_pretrained(scaled(family), str(tmp_path / "ours")).eval()
    want = _logits(mine)
    torch.testing.assert_close(_logits(back), want, atol=1e-4, rtol=0)

    base = {n: p.detach().clone() for n, p in scaled(family).named_parameters()}
    surgery.merge(mine, 0)
    torch.testing.assert_close(_logits(mine), want, atol=1e-4, rtol=0)
    surgery.unmerge(mine)
    plain = surgery.unload(mine)
    for name, p in plain.named_parameters():
        torch.testing.assert_close(p, base[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_first_step_loss_is_transformers_own(family):
    model = scaled(family)
    surgery.inject(model, ALL_R4, trainable=True)
    randomize_slot(model, 0, std=0.2, seed=4)
    labels = IDS.clone()
    labels[:, :5] = IGNORE_INDEX  # a completion-only loss, as training takes it
    batch = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": labels}
    ours = loss_sum(model, batch, "fp32") / (labels[:, 1:] != IGNORE_INDEX).sum()
    theirs = model(input_ids=IDS, labels=labels).loss
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    ours.backward()
    assert all(p.grad is not None for p in surgery.adapter_parameters(model, 0))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_concurrent_mixed_serving_equals_peft_solo(family, tmp_path):
    store = family_store(family, tmp_path)
    reference = PeftReference(family, store)
    model = scaled(family)
    table = SlotTable(model, AdapterCache(store, 10**7), n_slots=4, max_rank=8)
    engine = Engine(model, tiny_tokenizer(VOCAB), table, max_batch=4)
    g = torch.Generator().manual_seed(7)
    plan = [(name, torch.randint(3, VOCAB - 3, (int(n),), generator=g).tolist(), 4)
            for name, n in zip(["qv-r2", "all-r4", "prefix", BASE] * 2,
                               [6, 9, 7, 10, 8, 5, 11, 6], strict=True)]
    handles = []
    for i, (name, prompt, n) in enumerate(plan):
        handles.append(engine.submit(Request(prompt, adapter=name, max_new_tokens=n,
                                             ignore_eos=True)))
        if i % 3 == 2:
            engine.step()
    while engine.busy():
        engine.step()
    for (name, prompt, n), h in zip(plan, handles, strict=True):
        done = h.result()
        assert done.error is None, (name, done.error)
        assert list(done.tokens) == reference.greedy(name, prompt, n)[0], (family, name)
