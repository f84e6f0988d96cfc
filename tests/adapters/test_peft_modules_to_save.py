"""PEFT's ``modules_to_save`` (a full ``lm_head`` copy per adapter): PEFT's file loads, each
row of a mixed batch equals PEFT's solo logits, merge/unmerge round trips, our file loads
in PEFT, and a slot table refuses copies over its byte budget."""

import copy

import peft
import pytest
import torch

from loratree import surgery
from loratree.adapters import AdapterStore, load_adapter, save_adapter
from loratree.adapters.cache import AdapterCache
from loratree.adapters.slot_table import SlotTable
from loratree.errors import CopyTooLargeError, ShapeMismatchError
from tests.adapters.extras_common import (
    LAYOUTS,
    PLAIN,
    loaded,
    made_adapters,
    mixed,
    random_ids,
    solo,
)
from tests.adapters.extras_common import tiny_llama as build

SAVE = {"target_modules": ["q_proj"], "r": 2, "lora_alpha": 4, "modules_to_save": ["lm_head"]}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("mts")
    base = build()
    return base, made_adapters(root, base, SAVE, PLAIN, seed=20)


@pytest.mark.parametrize("layout", ["decode-gather", "prefill-gather", "mixed"])
def test_mixed_batch_rows_equal_peft_solo(made, layout):
    base, paths = made
    model = loaded(base, paths)
    rows, length = LAYOUTS[layout]
    ids = random_ids(len(rows), length, seed=2)
    got = mixed(model, rows, ids)
    for i, s in enumerate(rows):
        ref = solo(base, paths[s] if s >= 0 else None, ids)[i]
        torch.testing.assert_close(got[i], ref, atol=1e-4, rtol=0)


def test_merge_unmerge_round_trip_and_our_file_in_peft(made, tmp_path):
    base, paths = made
    model = loaded(base, paths)
    rows, length = LAYOUTS["prefill-gather"]
    ids = random_ids(len(rows), length, seed=3)
    before = mixed(model, rows, ids)
    head = base.lm_head.weight.detach().clone()
    surgery.merge(model, 0)
    torch.testing.assert_close(mixed(model, rows, ids), before, atol=1e-5, rtol=0)
    surgery.unmerge(model)
    assert torch.equal(surgery.copy_layers(model)["lm_head"].base.weight, head)
    save_adapter(model, tmp_path / "ours", 0)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad(), surgery.context(model).use(0):
        torch.testing.assert_close(theirs(ids).logits, model(ids).logits, atol=1e-4, rtol=0)


def test_wrong_copy_shape_is_refused_naming_the_key(made, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    base, paths = made
    bad = shutil.copytree(paths[0], tmp_path / "bad")
    f = bad / "adapter_model.safetensors"
    t = load_file(str(f))
    t["base_model.model.lm_head.weight"] = torch.zeros(127, 32)
    save_file(t, str(f))
    with pytest.raises(ShapeMismatchError, match=r"lm_head\.weight"):
        load_adapter(copy.deepcopy(base), bad)


def test_slot_table_refuses_copies_over_its_budget(made, tmp_path):
    base, paths = made
    store = AdapterStore(tmp_path / "store")
    store.add("save", paths[0])
    model = copy.deepcopy(base)
    table = SlotTable(model, AdapterCache(store, 10**7), n_slots=2, max_rank=4,
                      max_copy_bytes=1000)
    with pytest.raises(CopyTooLargeError, match=r"'save'.*16,384 bytes"):
        table.activate("save")
    roomy = SlotTable(copy.deepcopy(base), AdapterCache(store, 10**7), n_slots=2, max_rank=4)
    slot = roomy.activate("save")
    ids = random_ids(2, 5)
    got = mixed(roomy.model, [slot, -1], ids)
    torch.testing.assert_close(got[0], solo(base, paths[0], ids)[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[1], solo(base, None, ids)[1], atol=1e-4, rtol=0)
