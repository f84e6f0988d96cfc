"""PEFT's ``trainable_token_indices`` (an adapter's own rows for some token ids of the
input embedding, shared by a tied LM head): PEFT's files load with PEFT's logits, every
row of a mixed batch equals PEFT's solo logits (tied and untied models), through a slot
table and the engine (packed steps too), merge/unmerge/switch round trips, our trained
files load in PEFT, and bad files get typed errors naming the key."""

import copy
import json
import shutil

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from loratree import surgery
from loratree.adapters import AdapterStore, load_adapter, read_adapter, save_adapter
from loratree.config import LoraConfig
from loratree.errors import (
    AdapterConfigError,
    CopyTooLargeError,
    MissingKeyError,
    NonFiniteError,
    ShapeMismatchError,
    UnexpectedKeyError,
)
from loratree.layers import TokenRows
from loratree.models.tiny import tiny_tokenizer
from loratree.serve import Engine
from loratree.serve.slot_table import BASE, SlotTable
from loratree.tree.cache import AdapterCache
from tests.adapters.extras_common import LAYOUTS, VOCAB, loaded, mixed, peft_made, solo
from tests.conftest import keep_logits
from tests.serve.common import run_plan

IDS_A = [3, 5, 7, 11, 64]
IDS_B = [5, 9, 100, 127]  # shares id 5 with IDS_A
FIRST = {"target_modules": ["q_proj", "v_proj"], "r": 2, "lora_alpha": 4,
         "trainable_token_indices": IDS_A}
ADAPTERS = (FIRST,
            {"target_modules": ["q_proj", "v_proj"], "r": 2, "lora_alpha": 4},
            {"target_modules": ["o_proj"], "r": 3, "lora_alpha": 3,
             "trainable_token_indices": {"embed_tokens": IDS_B}},
            {"target_modules": ["q_proj", "gate_proj", "up_proj"], "r": 4, "lora_alpha": 8})
KEY = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"


def llama(tied: bool, seed: int = 0) -> LlamaForCausalLM:
    """A tiny Llama, its LM head tied to the embedding or not (weights x3, so outputs
    depend visibly on the adapter)."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=tied)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    model.generation_config.eos_token_id = None
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    return model


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def made(request, tmp_path_factory):
    """The base and four PEFT adapters: 0 with token rows (a list), 2 with token rows on
    other ids (a dict), 1 and 3 plain LoRA."""
    root = tmp_path_factory.mktemp("tokens")
    base = llama(request.param)
    paths = [root / f"a{i}" for i in range(len(ADAPTERS))]
    for i, (path, fields) in enumerate(zip(paths, ADAPTERS, strict=True)):
        peft_made(base, path, seed=40 + i, **fields)
    return base, paths


def token_ids(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    """Random ids, half of them drawn from both adapters' token ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=g)
    special = torch.tensor(sorted(set(IDS_A) | set(IDS_B)))
    pick = special[torch.randint(0, len(special), (rows, length), generator=g)]
    return torch.where(torch.rand(rows, length, generator=g) < 0.5, pick, ids)


def test_peft_file_layout_and_loads_with_peft_logits(made):
    base, paths = made
    keys = load_file(str(paths[0] / "adapter_model.safetensors"))
    assert keys[KEY].shape == (len(IDS_A), 32) and not any("lm_head" in k for k in keys)
    raw = json.loads((paths[0] / "adapter_config.json").read_text())
    assert raw["trainable_token_indices"] == IDS_A
    ids = token_ids(3, 8)
    ours = copy.deepcopy(base)
    load_adapter(ours, paths[0])
    tied = base.config.tie_word_embeddings
    assert isinstance(ours.lm_head, TokenRows) == tied
    with torch.no_grad():
        got = ours(ids).logits
    ref = solo(base, paths[0], ids)
    assert (ref - solo(base, None, ids)).abs().max() > 1e-2
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["decode-gather", "prefill-gather", "runs", "mixed"])
def test_mixed_batch_rows_equal_peft_solo(made, layout):
    base, paths = made
    model = loaded(base, paths)
    rows, length = LAYOUTS[layout]
    ids = token_ids(len(rows), length, seed=2)
    got = mixed(model, rows, ids)
    refs = {s: solo(base, paths[s] if s >= 0 else None, ids) for s in set(rows)}
    for i, s in enumerate(rows):
        torch.testing.assert_close(got[i], refs[s][i], atol=1e-4, rtol=0)


def test_merge_unmerge_switch_round_trip(made):
    base, paths = made
    model = loaded(base, paths)
    rows, length = LAYOUTS["mixed"]
    ids = token_ids(len(rows), length, seed=3)
    before = mixed(model, rows, ids)
    emb = surgery.token_layers(model)["model.embed_tokens"]
    table = emb.base.weight.detach().clone()
    surgery.merge(model, 0)
    merged_rows = emb.base.weight[torch.tensor(IDS_A)]
    torch.testing.assert_close(merged_rows, emb.rows_of(0), atol=0, rtol=0)
    if base.config.tie_word_embeddings:
        assert model.lm_head.base.weight is emb.base.weight  # the head is merged too
    torch.testing.assert_close(mixed(model, rows, ids), before, atol=1e-4, rtol=0)
    with torch.no_grad(), surgery.context(model).use(-1):
        plain = model(ids).logits  # the merged rows are taken out again for the base
    torch.testing.assert_close(plain, solo(base, None, ids), atol=1e-4, rtol=0)
    surgery.switch(model, 2)
    torch.testing.assert_close(mixed(model, rows, ids), before, atol=1e-4, rtol=0)
    surgery.switch(model, 1)
    assert torch.equal(emb.base.weight, table)  # slot 1 holds no rows: the table's own
    surgery.switch(model, 0)
    surgery.unmerge(model)
    assert torch.equal(emb.base.weight, table)
    torch.testing.assert_close(mixed(model, rows, ids), before, atol=1e-5, rtol=0)  # LoRA: fp
    plain = surgery.merge_and_unload(loaded(base, paths[:1]), 0)
    assert not surgery.token_layers(plain)
    torch.testing.assert_close(plain(ids).logits, solo(base, paths[0], ids), atol=1e-4, rtol=0)


def test_trained_adapter_loads_in_peft_with_equal_logits(made, tmp_path):
    base, _ = made
    model = copy.deepcopy(base)
    config = LoraConfig(rank=2, alpha=4, targets=("q_proj",), trainable_token_indices=IDS_B)
    surgery.inject(model, config)
    rows = surgery.token_layers(model)["model.embed_tokens"].rows_of(0)
    start = rows.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_ids(4, 10, seed=4)
    for _ in range(3):
        with surgery.context(model).use(0):
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(rows.detach(), start)  # the token rows learned
    save_adapter(model, tmp_path / "ours", 0)
    raw = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert raw["trainable_token_indices"] == IDS_B
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad(), surgery.context(model).use(0):
        ours = model(ids).logits
        torch.testing.assert_close(theirs(ids).logits, ours, atol=1e-4, rtol=0)
    again = copy.deepcopy(base)
    load_adapter(again, tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ours, atol=1e-5, rtol=0)


def _store(tmp_path, paths):
    store = AdapterStore(tmp_path / "store")
    for i, path in enumerate(paths):
        store.add(f"a{i}", path)
    return store


def _greedy(base, path, prompt, n):
    """PEFT's greedy continuation (no cache: the whole sequence each step) and each step's
    logits."""
    model = copy.deepcopy(base)
    if path is not None:
        model = peft.PeftModel.from_pretrained(model, path).eval()
    ids, logits = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits.append(model(torch.tensor([ids])).logits[0, -1])
            ids.append(int(logits[-1].argmax()))
    return ids[len(prompt):], torch.stack(logits)


@pytest.mark.parametrize("pack", [False, True], ids=["unpacked", "packed"])
def test_engine_mixed_requests_equal_peft_solo_greedy(made, tmp_path, pack):
    base, paths = made
    model = copy.deepcopy(base)
    table = SlotTable(model, AdapterCache(_store(tmp_path, paths), 10**7), n_slots=4,
                      max_rank=8)
    engine = Engine(model, tiny_tokenizer(VOCAB), table, pack_joins=pack)
    kept = keep_logits(engine)
    prompts = [[3, 5, 40, 7], [9, 100, 5], [64, 11, 3, 127, 2], [5, 5, 9]]
    plan = [("a0", prompts[0], 6, 0), ("a2", prompts[1], 5, 0), (BASE, prompts[2], 4, 1),
            ("a1", prompts[3], 5, 1), ("a3", prompts[0], 4, 2), ("a2", prompts[2], 4, 2),
            ("a0", prompts[1], 3, 3)]
    handles = run_plan(engine, plan)
    assert (engine.packed_joins > 0) == pack
    for i, (name, prompt, n, _) in enumerate(plan):
        path = None if name == BASE else paths[int(name[1:])]
        tokens, logits = _greedy(base, path, prompt, n)
        assert list(handles[i].result().tokens) == tokens, name
        torch.testing.assert_close(torch.stack(kept[handles[i]]), logits, atol=1e-4, rtol=0)


def test_slot_table_refuses_rows_over_its_budget(made, tmp_path):
    base, paths = made
    store = _store(tmp_path, paths[:1])
    table = SlotTable(copy.deepcopy(base), AdapterCache(store, 10**7), n_slots=2,
                      max_rank=4, max_copy_bytes=500)
    need = len(IDS_A) * 32 * 4 + len(IDS_A) * 8
    with pytest.raises(CopyTooLargeError, match=rf"'a0'.*trainable token rows.*{need:,} bytes"):
        table.activate("a0")
    table.max_copy_bytes = need
    slot = table.activate("a0")
    ids = token_ids(2, 5)
    got = mixed(table.model, [slot, -1], ids)
    torch.testing.assert_close(got[0], solo(base, paths[0], ids)[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[1], solo(base, None, ids)[1], atol=1e-4, rtol=0)


def _broken(paths, tmp_path, tensors=None, config=None):
    bad = shutil.copytree(paths[0], tmp_path / "bad")
    f = bad / "adapter_model.safetensors"
    t = load_file(str(f))
    if tensors is not None:
        tensors(t)
        save_file(t, str(f))
    if config is not None:
        c = bad / "adapter_config.json"
        raw = json.loads(c.read_text())
        config(raw)
        c.write_text(json.dumps(raw))
    return bad


BAD = {
    "out-of-vocabulary": (None, lambda c: c.update(trainable_token_indices=[3, 5, 7, 11, 128]),
                          ShapeMismatchError, r"token id 128.*vocabulary"),
    "duplicated": (None, lambda c: c.update(trainable_token_indices=[3, 5, 7, 5, 64]),
                   AdapterConfigError, r"trainable_token_indices repeats token ids \[5\]"),
    "rows-vs-ids": (lambda t: t.update({KEY: t[KEY][:4]}), None, ShapeMismatchError,
                    r"trainable_tokens_delta.*\(4, 32\).*5 ids"),
    "dim": (lambda t: t.update({KEY: torch.zeros(5, 31)}), None, ShapeMismatchError,
            r"trainable_tokens_delta.*\(5, 31\).*32 wide"),
    "nan": (lambda t: t[KEY].__setitem__((1, 2), float("nan")), None, NonFiniteError,
            r"trainable_tokens_delta.*NaN"),
    "missing": (lambda t: t.pop(KEY), None, MissingKeyError, r"trainable_tokens_delta"),
    "unexpected": (None, lambda c: c.pop("trainable_token_indices"), UnexpectedKeyError,
                   r"trainable_tokens_delta"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files_are_refused_naming_the_key(made, tmp_path, case):
    base, paths = made
    tensors, config, error, match = BAD[case]
    bad = _broken(paths, tmp_path, tensors, config)
    model = copy.deepcopy(base)
    with pytest.raises(error, match=match):
        load_adapter(model, bad)
    assert not surgery.token_layers(model) and not surgery.lora_layers(model)
    if case == "out-of-vocabulary":
        read_adapter(bad)  # the vocabulary is the model's: only loading can check it


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_train_flag_learns_token_rows_that_peft_loads(tmp_path, tied):
    from loratree.cli.main import build_parser
    from loratree.cli.train_cmd import config_from_args
    from loratree.models.tiny import tiny_tokenizer
    from loratree.train import TrainConfig, train

    args = build_parser().parse_args(
        ["train", "--trainable-tokens", "5,6,7", "--rank", "2", "--targets", "q_proj",
         "--max-steps", "3", "--batch-size", "2", "--lr", "1e-2", "--warmup-steps", "0",
         "--out", str(tmp_path / "a")])
    config = config_from_args(args)
    assert config.lora().trainable_token_indices == (5, 6, 7)
    with pytest.raises(ValueError, match=r"trainable_tokens repeats token ids \[6\]"):
        TrainConfig(trainable_tokens=(6, 6))
    base = llama(tied)
    records = [{"prompt": "w5 w6", "completion": "w6 w7"}, {"prompt": "w7", "completion": "w5"}]
    train(config, model=copy.deepcopy(base), tokenizer=tiny_tokenizer(VOCAB), rows=records,
          progress=False)
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))[KEY]
    assert not torch.equal(saved, base.model.embed_tokens.weight[[5, 6, 7]])  # learned
    ids = token_ids(2, 6, seed=5) % 8
    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, solo(base, tmp_path / "a", ids),
                                   atol=1e-4, rtol=0)
