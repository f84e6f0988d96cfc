"""Serving on sliding-window families (Mistral, Gemma 2, Gemma 3) with prompts three times
the window: requests join a running batch at random times (packed into decode steps or
prefilled), LoRA of two ranks, prefix and base rows mixed, and every response equals PEFT's
solo output."""

import random

import pytest
import torch

from loratree.models.families import SLIDING, VOCAB, WINDOW
from loratree.models.tiny import tiny_tokenizer
from loratree.serve import Engine, Request
from loratree.serve.slot_table import BASE, SlotTable
from loratree.tree.cache import AdapterCache
from tests.conftest import keep_logits
from tests.families.common import PeftReference, family_store, scaled

NAMES = ["qv-r2", "all-r4", "prefix", BASE]


def _engine(family, store, pack_joins=True):
    model = scaled(family)
    table = SlotTable(model, AdapterCache(store, 10**7), n_slots=4, max_rank=8)
    return Engine(model, tiny_tokenizer(VOCAB), table, max_batch=6,
                  pack_joins=pack_joins)


@pytest.mark.parametrize("family", sorted(SLIDING))
def test_requests_joining_at_random_times_equal_peft_solo(family, tmp_path):
    store = family_store(family, tmp_path)
    reference = PeftReference(family, store)
    engine = _engine(family, store)
    kept = keep_logits(engine)
    rng = random.Random(family)
    joined_running = 0
    for _ in range(5):  # rounds
        plan = [(rng.choice(NAMES), [rng.randrange(3, VOCAB - 3) for _ in range(3 * WINDOW)],
                 rng.randrange(2, 8)) for _ in range(16)]
        handles = []
        for name, prompt, n in plan:
            joined_running += bool(engine.load()[1])
            handles.append(engine.submit(Request(prompt, adapter=name, max_new_tokens=n,
                                                 ignore_eos=True)))
            for _ in range(rng.randrange(3)):
                engine.step()
        while engine.busy():
            engine.step()
        for (name, prompt, n), h in zip(plan, handles, strict=True):
            done = h.result()
            tokens, logits = reference.greedy(name, prompt, n)
            assert done.error is None, (name, done.error)
            assert list(done.tokens) == tokens, (family, name, prompt)
            torch.testing.assert_close(torch.stack(kept[h]), torch.stack(logits),
                                       atol=1e-4, rtol=0)
    assert joined_running >= 40  # most requests joined a running batch
    assert engine.packed_joins > 0


def test_batched_prefill_of_prefix_rows_keeps_each_row_contiguous(tmp_path):
    """Prefix rows of different prompt lengths submitted together (one admission) on a
    sliding model, with packing off so they prefill in batched forwards."""
    family = "gemma3"
    store = family_store(family, tmp_path)
    reference = PeftReference(family, store)
    engine = _engine(family, store, pack_joins=False)
    prompts = [[5 + i for i in range(n)] for n in (9, 12, 14, 12)]
    plan = [("prefix", prompts[0]), ("prefix", prompts[1]), ("qv-r2", prompts[2]),
            ("prefix", prompts[3])]
    handles = [engine.submit(Request(p, adapter=a, max_new_tokens=5, ignore_eos=True))
               for a, p in plan]
    while engine.busy():
        engine.step()
    for (name, prompt), h in zip(plan, handles, strict=True):
        assert list(h.result().tokens) == reference.greedy(name, prompt, 5)[0], name


def test_prefill_groups_split_prefix_rows_by_prompt_length_only_when_windowed():
    from loratree.serve.grouping import prefill_groups

    lens, prefix = [5, 7, 5, 9, 7], [True, True, False, True, True]
    assert prefill_groups(lens, prefix, windowed=False) == [[0, 1, 2, 3, 4]]
    assert prefill_groups(lens, prefix, windowed=True) == [[0], [1, 4], [2], [3]]
