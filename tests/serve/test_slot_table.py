"""The slot table: adapters from the cache into model slots, exact against loading them
alone; LRU reuse of idle slots; rank limit; merged switching that does not drift."""

import copy
import random

import pytest
import torch

from loratree import surgery
from loratree.adapters import AdapterStore, load_adapter
from loratree.config import LoraConfig, PrefixConfig
from loratree.errors import AdapterInUseError, RankTooLargeError
from loratree.models.tiny import tiny_llama
from loratree.serve.slot_table import BASE, SlotTable
from loratree.tree.cache import AdapterCache
from tests.conftest import randomize_slot

ADAPTERS = {
    "qv-r2": LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj")),
    "all-r4": LoraConfig(rank=4, alpha=16, targets=("all-linear",)),
    "mlp-r3": LoraConfig(rank=3, alpha=3, targets=("gate_proj", "down_proj")),
    "big-r8": LoraConfig(rank=8, alpha=8, targets=("q_proj",)),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = AdapterStore(tmp_path_factory.mktemp("store"))
    for i, (name, cfg) in enumerate(ADAPTERS.items()):
        model = tiny_llama()
        surgery.inject(model, cfg)
        randomize_slot(model, 0, std=0.05, seed=i)  # |dW| a fraction of |W|, as trained
        store.save(name, model, 0)
    model = tiny_llama()
    geo = surgery.geometry(model)
    surgery.add_prefix(model, PrefixConfig(n_virtual=3), vectors=torch.randn(3, geo.width))
    store.save("prefix", model, 0)
    return store


def _table(store, n_slots=3, max_rank=4):
    model = tiny_llama()
    cache = AdapterCache(store, 10**7)
    return model, SlotTable(model, cache, n_slots=n_slots, max_rank=max_rank)


def _alone(store, name, ids, mask):
    model = tiny_llama()
    if name != BASE:
        load_adapter(model, store.path_of(name))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


IDS = torch.randint(0, 100, (4, 6), generator=torch.Generator().manual_seed(0))
MASK = torch.ones_like(IDS)


def test_a_mixed_batch_equals_each_adapter_loaded_alone(store):
    model, table = _table(store)
    names = ["qv-r2", "prefix", BASE, "all-r4"]
    slots = [table.activate(n) for n in names]
    assert slots[2] == -1 and len(set(slots)) == 4
    with torch.no_grad(), table.ctx.use(torch.tensor(slots)):
        mixed = model(input_ids=IDS, attention_mask=MASK).logits
    base = _alone(store, BASE, IDS, MASK)
    for row, name in enumerate(names):
        want = _alone(store, name, IDS[row:row + 1], MASK[row:row + 1])
        torch.testing.assert_close(mixed[row], want[0], atol=1e-5, rtol=0)
        if name != BASE:  # each adapter changes the output well beyond the tolerance
            assert (want[0] - base[row]).abs().max() > 1e-3


def test_idle_slots_are_reused_least_recently_used_first(store):
    model, table = _table(store, n_slots=2)
    a = table.activate("qv-r2")
    b = table.activate("all-r4")
    table.activate("qv-r2")                      # qv-r2 is now the more recent
    c = table.activate("mlp-r3")                 # takes all-r4's slot
    assert c == b and table.slot_of("all-r4") is None and table.slot_of("qv-r2") == a
    assert "all-r4" in table.cache and table.cache.stats.misses == 3
    held = table.acquire("qv-r2")
    table.acquire("mlp-r3")
    with pytest.raises(AdapterInUseError, match="running requests"):
        table.activate("all-r4")
    table.release(held)
    assert table.activate("all-r4") == a         # qv-r2's slot was free to take
    with torch.no_grad(), table.ctx.use(a):
        got = model(input_ids=IDS, attention_mask=MASK).logits
    torch.testing.assert_close(got, _alone(store, "all-r4", IDS, MASK), atol=1e-5, rtol=0)


def test_a_refilled_slot_serves_its_new_adapter_in_a_mixed_batch(store):
    """The table owns its slots (its linear layers keep them stacked for serving);
    refilling a slot through the table copies the new adapter into its row of the
    stacks, so the next mixed batch of few tokens (the batched path) runs it."""
    model, table = _table(store, n_slots=2)
    assert all(layer.a_stack is not None for layer in surgery.lora_layers(model).values()
               if layer.batchable)
    for names in (["qv-r2", "all-r4"], ["qv-r2", "mlp-r3"]):  # mlp-r3 takes all-r4's slot
        slots = [table.activate(n) for n in names]
        rows = [names[0], names[0], names[1], names[1]]
        index = torch.tensor([slots[0], slots[0], slots[1], slots[1]])
        with torch.no_grad(), table.ctx.use(index):
            mixed = model(input_ids=IDS, attention_mask=MASK).logits
        for row, name in enumerate(rows):
            want = _alone(store, name, IDS[row:row + 1], MASK[row:row + 1])
            torch.testing.assert_close(mixed[row], want[0], atol=1e-5, rtol=0)


def test_rank_above_the_slot_maximum_is_refused(store):
    _, table = _table(store, max_rank=4)
    with pytest.raises(RankTooLargeError, match="rank 8"):
        table.activate("big-r8")
    assert table.active() == {} and table.cache.stats.entries == 1
    assert table.activate("qv-r2") >= 0


def test_merged_switching_1000_times_stays_within_1e_5_of_max_w(store):
    model, table = _table(store)
    truth = copy.deepcopy(model)  # the untouched base weights
    rng = random.Random(0)
    names = ["qv-r2", "all-r4", "mlp-r3", BASE]
    for _ in range(1000):
        current = rng.choice(names)
        table.merge(current)
    if current == BASE:
        table.merge("all-r4")
        current = "all-r4"
    slot = table.slot_of(current)
    base_layers = dict(truth.named_modules())
    worst = 0.0
    for name, layer in table.layers.items():
        w0 = base_layers[name].weight.detach()
        want = w0 + (layer.delta_weight(slot) if layer.specs[slot].rank else 0.0)
        err = (layer.base.weight - want).abs().max().item() / w0.abs().max().item()
        worst = max(worst, err)
    assert worst <= 1e-5, worst


def test_plan_merges_a_single_adapter_batch_and_gives_the_same_logits(store):
    model, table = _table(store)
    plan = table.plan(["all-r4"] * 4, new_tokens=32)
    assert plan.mode == "merged" and table.merged == "all-r4"
    with torch.no_grad(), table.ctx.use(torch.tensor(plan.slots)):
        merged = model(input_ids=IDS, attention_mask=MASK).logits
    torch.testing.assert_close(merged, _alone(store, "all-r4", IDS, MASK), atol=1e-5, rtol=0)
    plan = table.plan(["qv-r2", "all-r4", BASE, "prefix"], new_tokens=32)
    assert plan.mode == "unmerged"
    with torch.no_grad(), table.ctx.use(torch.tensor(plan.slots)):
        mixed = model(input_ids=IDS, attention_mask=MASK).logits
    for row, name in enumerate(["qv-r2", "all-r4", BASE, "prefix"]):
        want = _alone(store, name, IDS[row:row + 1], MASK[row:row + 1])
        torch.testing.assert_close(mixed[row], want[0], atol=1e-5, rtol=0)
    assert table.plan(["qv-r2"], new_tokens=2).mode == "unmerged"  # too short to switch
