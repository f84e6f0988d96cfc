"""Adapter trees: a node's path composes exactly by rank concatenation, serves like its
adapters applied one by one, exports to a flat adapter PEFT loads, and goes stale when an
ancestor changes."""

import json
import os

import peft
import pytest
import torch

from loratree import surgery
from loratree.adapters import AdapterStore, save_adapter
from loratree.adapters.files import read_adapter
from loratree.adapters.node_files import write_record
from loratree.config import LoraConfig, PrefixConfig
from loratree.errors import AdapterInUseError, TreeError
from loratree.models.tiny import tiny_tokenizer
from loratree.serve import Engine, Request
from loratree.serve.slot_table import SlotTable
from loratree.tree import Tree, nodes, render
from loratree.tree.cache import AdapterCache
from tests.conftest import keep_logits
from tests.serve.common import VOCAB, adapter_dir, tiny_model

# root -> child -> grandchild: different ranks, targets, alphas and scaling rules
PATH = {
    "support": LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj")),
    "support/fr": LoraConfig(rank=3, alpha=5, targets=("all-linear",), use_rslora=True),
    "support/fr/acme": LoraConfig(rank=1, alpha=2, targets=("v_proj", "down_proj")),
}


def _build(tmp, seeds=(1, 2, 3)):
    store = AdapterStore(tmp / "store")
    for (name, cfg), seed in zip(PATH.items(), seeds, strict=True):
        store.add(name, adapter_dir(tmp, name, cfg, seed, store, metrics={"eval_loss": 1.5}))
    return store


@pytest.fixture
def store(tmp_path):
    return _build(tmp_path)


def _naive_deltas(store, names):
    """Per module, sum over the path of s_i * B_i @ A_i, each from its own file (fp64)."""
    total = {}
    for name in names:
        f = read_adapter(store.path_of(name))
        for module, (a, b) in f.weights.items():
            c = f.config
            s = c.alpha / (a.shape[0] ** 0.5 if c.use_rslora else a.shape[0])
            d = s * b.double() @ a.double()
            total[module] = total.get(module, 0) + d
    return total


def test_the_composed_path_equals_the_sum_of_its_deltas(store):
    composed = Tree(store).composed("support/fr/acme")
    want = _naive_deltas(store, PATH)
    assert set(composed.weights) == set(want)
    for module, (a, b) in composed.weights.items():
        got = b.double() @ a.double()  # scale 1: the nodes' scales are folded into B
        torch.testing.assert_close(got, want[module], atol=1e-6, rtol=0)
    ranks = {m: a.shape[0] for m, (a, _) in composed.weights.items()}
    assert ranks["model.layers.0.self_attn.v_proj"] == 2 + 3 + 1
    assert ranks["model.layers.0.self_attn.q_proj"] == 2 + 3
    assert ranks["model.layers.0.mlp.up_proj"] == 3
    tree = Tree(store)
    assert tree.path("support/fr/acme") == list(PATH)
    assert (tree.depth("support/fr/acme"), tree.total_rank("support/fr/acme")) == (3, 6)


def _applied_one_by_one(store, names):
    """The reference model: each path adapter's s B A added into W in turn."""
    model = tiny_model()
    with torch.no_grad():
        for name in names:
            f = read_adapter(store.path_of(name))
            c = f.config
            for module, (a, b) in f.weights.items():
                s = c.alpha / (a.shape[0] ** 0.5 if c.use_rslora else a.shape[0])
                w = model.get_submodule(module).weight
                w += s * b @ a
    return model.eval()


PROMPT = [5, 9, 13, 3, 40, 7]


def test_serving_a_node_equals_its_adapters_applied_one_by_one(store):
    want_model = _applied_one_by_one(store, PATH)
    model = tiny_model()
    table = SlotTable(model, AdapterCache(store, 10**7), n_slots=2, max_rank=8)
    engine = Engine(model, tiny_tokenizer(VOCAB), table)
    kept = keep_logits(engine)
    h = engine.submit(Request(PROMPT, adapter="support/fr/acme", max_new_tokens=6,
                                   ignore_eos=True))
    other = engine.submit(Request(PROMPT[:3], adapter="support", max_new_tokens=4,
                                       ignore_eos=True))
    while engine.busy():
        engine.step()
    ids, logits = list(PROMPT), []
    with torch.no_grad():
        for _ in range(6):
            out = want_model(input_ids=torch.tensor([ids])).logits[0, -1]
            logits.append(out)
            ids.append(int(out.argmax()))
    assert list(h.result().tokens) == ids[len(PROMPT):]
    torch.testing.assert_close(torch.stack(kept[h]), torch.stack(logits), atol=1e-5, rtol=0)
    assert other.result().finish_reason == "length"


def test_the_exported_depth3_node_loads_in_peft_with_the_same_logits(store, tmp_path):
    out = Tree(store).export("support/fr/acme", tmp_path / "flat")
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    theirs = peft.PeftModel.from_pretrained(tiny_model(), out).eval()
    ours = tiny_model()
    table = SlotTable(ours, AdapterCache(store, 10**7), n_slots=1, max_rank=8)
    slot = table.activate("support/fr/acme")
    ids = torch.tensor([PROMPT])
    with torch.no_grad(), surgery.context(ours).use(slot):
        got = ours(input_ids=ids).logits
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_replaced_parent_makes_descendants_stale_until_accepted(store, tmp_path):
    cache = AdapterCache(store, 10**7)
    tree = Tree(store)
    before = cache.get("support/fr/acme")
    assert cache.get("support/fr/acme") is before  # the composition is cached
    hits = cache.stats.hits
    assert hits >= 1
    assert not any(tree.stale(n) for n in PATH)
    store.add("support", adapter_dir(tmp_path, "support", PATH["support"], 9))  # retrained root
    assert not tree.stale("support")
    assert tree.stale("support/fr") and tree.stale("support/fr/acme")
    after = cache.get("support/fr/acme")  # recomposed from the new root
    assert after is not before and after.version != before.version
    want = _naive_deltas(store, PATH)
    for module, (a, b) in after.lora.weights.items():
        torch.testing.assert_close(b.double() @ a.double(), want[module], atol=1e-6, rtol=0)
    assert "STALE" in render(tree.nodes())
    tree.accept("support/fr")
    assert not tree.stale("support/fr")
    assert tree.stale("support/fr/acme")  # it was trained on the old path: its own call
    tree.accept("support/fr/acme")
    assert not any(tree.stale(n) for n in PATH)
    assert "STALE" not in render(tree.nodes())
    weights = read_adapter(store.path_of("support/fr/acme")).weights
    for module, (a, _) in read_adapter(tmp_path / "src-support_fr_acme-3").weights.items():
        assert torch.equal(weights[module][0], a)  # accepting changes no weight


def test_show_draws_the_tree_with_ranks_sizes_and_metrics(store):
    text = render(Tree(store).nodes())
    lines = text.splitlines()
    assert lines[1].startswith("support ")
    assert lines[2].startswith("└── fr ") and lines[3].startswith("    └── acme ")
    assert "eval_loss 1.5" in lines[3]
    fr = Tree(store).nodes()[1]
    assert (fr.name, fr.depth, fr.rank, fr.total_rank, fr.children) == (
        "support/fr", 2, 3, 5, ("support/fr/acme",))


def test_a_node_and_its_parent_share_the_store_and_removal_keeps_the_tree_whole(store):
    assert [i.name for i in store.list()] == list(PATH)
    with pytest.raises(AdapterInUseError, match="parent of support/fr"):
        store.remove("support")
    store.remove("support/fr/acme")
    store.remove("support/fr")
    assert [i.name for i in store.list()] == ["support"]


def test_inconsistent_trees_are_refused_with_the_reason(store, tmp_path):
    d = adapter_dir(tmp_path, "support/de", PATH["support/fr/acme"], 7, store,
                    metrics={"eval_loss": 1.5})
    with pytest.raises(TreeError, match="support/<name>"):
        store.add("other/de", d)  # its record says it is a child of support
    cache = AdapterCache(store, 10**7)
    (d / "tree.json").write_text("{not json")
    with pytest.raises(TreeError, match="not valid JSON"):
        store.add("support/de", d)
    (d / "tree.json").write_text(json.dumps({"parent": "support", "parent_hash": "x"}))
    with pytest.raises(TreeError, match="64 hex"):
        store.add("support/de", d)
    model = tiny_model()
    surgery.add_prefix(model, PrefixConfig(n_virtual=2))
    p = save_adapter(model, tmp_path / "prefix")
    write_record(p, nodes.record_for(store, "support"))
    with pytest.raises(TreeError, match="LoRA"):
        store.add("support/prefix", p)
    # a parent that vanished from under a node (removed behind the store's back)
    os.unlink(store.root / "support" / "fr" / "@")
    with pytest.raises(TreeError, match="not in the store"):
        cache.get("support/fr/acme")
    with pytest.raises(TreeError):
        Tree(store).composed("support/fr/acme")
    assert cache.get("support").kind == "lora"  # the rest keeps working


def test_the_http_server_serves_a_tree_path_as_model(store):
    import openai

    from tests.serve.conftest import live, make_engine

    want = make_engine(store).generate(Request(PROMPT, adapter="support/fr/acme",
                                               max_new_tokens=5, ignore_eos=True))
    with live(store) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0,
                               timeout=30)
        got = client.completions.create(model="support/fr/acme", prompt=PROMPT, max_tokens=5,
                                        temperature=0, extra_body={"ignore_eos": True})
        assert got.choices[0].text == want.text
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="support/fr/nobody", prompt=PROMPT, max_tokens=2)
