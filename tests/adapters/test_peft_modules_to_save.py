"""PEFT's ``modules_to_save`` (a full ``lm_head`` copy per adapter): PEFT's file loads, each
row of a mixed batch equals PEFT's solo logits, merge/unmerge round trips, our file loads
in PEFT (also after training the copy with loratree's trainer), bad copies get typed errors
naming the key, and a slot table refuses copies over its byte budget."""

import copy

import peft
import pytest
import torch

from loratree import surgery
from loratree.adapters import AdapterStore, load_adapter, save_adapter
from loratree.adapters.files import read_adapter
from loratree.errors import CopyTooLargeError, MissingKeyError, NonFiniteError, ShapeMismatchError
from loratree.models.tiny import tiny_tokenizer
from loratree.serve.slot_table import SlotTable
from loratree.tree.cache import AdapterCache
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

HEAD = "base_model.model.lm_head.weight"
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


def _nan_head(t):
    t[HEAD] = t[HEAD].clone()
    t[HEAD][3, 5] = float("nan")


@pytest.mark.parametrize(("edit", "error"), [
    (lambda t: t.__setitem__(HEAD, torch.zeros(127, 32)), ShapeMismatchError),
    (_nan_head, NonFiniteError),
    (lambda t: t.pop(HEAD), MissingKeyError),
], ids=["shape", "nan", "missing"])
def test_bad_copies_are_refused_naming_the_key(made, tmp_path, edit, error):
    import shutil

    from safetensors.torch import load_file, save_file
    base, paths = made
    bad = shutil.copytree(paths[0], tmp_path / "bad")
    f = bad / "adapter_model.safetensors"
    t = load_file(str(f))
    edit(t)
    save_file(t, str(f))
    model = copy.deepcopy(base)
    with pytest.raises(error, match=r"base_model\.model\.lm_head\.weight"):
        load_adapter(model, bad)
    assert not surgery.lora_layers(model) and not surgery.copy_layers(model)


def test_copy_trained_by_loratree_loads_in_peft_with_equal_logits(tmp_path):
    """loratree's trainer (three AdamW steps) on q_proj LoRA plus an lm_head copy: the copy
    moves away from the base head, the file names it as PEFT does, and PEFT's logits with
    the file equal ours."""
    from loratree.train import TrainConfig, train

    records = [{"prompt": f"w{i} w{i + 1}", "completion": f"w{i + 1} w{i}"} for i in range(5, 13)]
    model = build(vocab=64)
    cfg = TrainConfig(out=str(tmp_path / "a"), max_steps=3, batch_size=4, lr=1e-2, rank=2,
                      alpha=4, targets=("q_proj",), modules_to_save=("lm_head",),
                      eval_examples=0, warmup_steps=0)
    train(cfg, model=model, tokenizer=tiny_tokenizer(64), rows=records, progress=False)
    adapter = read_adapter(tmp_path / "a")
    assert adapter.config.modules_to_save == ("lm_head",) and set(adapter.copies) == {"lm_head"}
    fresh = build(vocab=64)
    moved = (adapter.copies["lm_head"]["weight"] - fresh.lm_head.weight.detach()).abs().max()
    assert moved > 1e-3  # the copy trained
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path / "a").eval()
    ids = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(4))
    model.eval()
    with torch.no_grad(), surgery.context(model).use(0):
        torch.testing.assert_close(model(ids).logits, theirs(ids).logits, atol=1e-4, rtol=0)


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
