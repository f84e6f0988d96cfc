"""Fused MoE experts (PEFT's target_parameters) on a tiny Qwen3-MoE: PEFT's files load with
PEFT's logits, serve in mixed batches row for row as PEFT alone, merge and unmerge back,
and loratree-trained adapters load in PEFT with equal logits."""

import copy
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from loratree import surgery
from loratree.adapters import AdapterStore, load_adapter, read_adapter, save_adapter
from loratree.config import LoraConfig
from loratree.errors import MissingKeyError, ShapeMismatchError
from loratree.layers import LoraParam
from loratree.models.tiny import tiny_qwen3_moe
from loratree.serve.slot_table import BASE, SlotTable
from loratree.tree.cache import AdapterCache

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
PEFT_ADAPTERS = {  # name -> PEFT LoraConfig kwargs
    "experts-r4": dict(r=4, lora_alpha=8, target_modules=[], target_parameters=EXPERTS),
    "experts-r2-rs": dict(r=2, lora_alpha=3, target_modules=["o_proj"],
                          target_parameters=["down_proj", "gate.weight"], use_rslora=True),
    "qv-r4": dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "all-linear-r2": dict(r=2, lora_alpha=4, target_modules="all-linear"),
}
IDS = torch.randint(0, 128, (6, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def base():
    return tiny_qwen3_moe()


def _peft_model(base, seed=1, **kw):
    """A PEFT model with random non-zero LoRA weights."""
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.fixture(scope="module")
def peft_dirs(base, tmp_path_factory):
    """Each adapter saved by PEFT, with its solo logits on IDS."""
    out = {}
    for i, (name, kw) in enumerate(PEFT_ADAPTERS.items()):
        model = _peft_model(base, seed=i + 1, **kw)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        with torch.no_grad():
            out[name] = (path, model(IDS).logits)
    return out


def _logits(model, index=None):
    with torch.no_grad(), surgery.context(model).use(index):
        return model(IDS).logits


def test_peft_keys_are_read_as_the_parameters_they_adapt(base, peft_dirs):
    """PEFT nests one wrapper per parameter of ``mlp.experts``: the inner (``base_layer``)
    key is gate_up_proj's, the outer down_proj's; per-expert rank r is r * E rows."""
    keys = load_file(peft_dirs["experts-r4"][0] / "adapter_model.safetensors")
    assert keys["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape \
        == (16, 32)  # gate_up_proj: r 4 x 4 experts, in = hidden
    model = copy.deepcopy(base)
    load_adapter(model, peft_dirs["experts-r4"][0])
    layers = surgery.lora_layers(model)
    up = layers["model.layers.0.mlp.experts.gate_up_proj"]
    down = layers["model.layers.0.mlp.experts.down_proj"]
    assert isinstance(up, LoraParam) and up.specs[0].rank == 4 and up.experts == 4
    assert tuple(up.lora_a[0].shape) == (4, 4, 32) and tuple(down.lora_a[0].shape) == (4, 4, 16)


@pytest.mark.parametrize("name", list(PEFT_ADAPTERS))
def test_peft_file_loads_with_peft_logits(base, peft_dirs, name):
    path, want = peft_dirs[name]
    model = copy.deepcopy(base)
    load_adapter(model, path)
    assert (want - _logits(model, -1)).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(_logits(model, 0), want, atol=1e-4, rtol=0)


def test_mixed_batch_rows_equal_peft_alone(base, peft_dirs):
    """Four adapters (two on experts with different ranks, q,v, all-linear) and the base in
    one batch: every row equals that adapter's PEFT logits alone."""
    model = copy.deepcopy(base)
    names = list(PEFT_ADAPTERS)
    slots = [load_adapter(model, peft_dirs[n][0]) for n in names]
    rows = [slots[1], -1, slots[0], slots[3], slots[2], slots[0]]
    mixed = _logits(model, torch.tensor(rows))
    with torch.no_grad():
        plain = base(IDS).logits
    for i, slot in enumerate(rows):
        want = plain[i] if slot < 0 else peft_dirs[names[slot]][1][i]
        torch.testing.assert_close(mixed[i], want, atol=1e-4, rtol=0)


def test_slot_table_serves_target_parameters(base, peft_dirs, tmp_path):
    """Through the store, the cache and a serving slot table (all-linear slots, which wrap
    the fused experts and routers as PEFT's all-linear does), a mixed batch with the
    base and a merged adapter switched in and out."""
    store = AdapterStore(tmp_path / "store")
    for name in PEFT_ADAPTERS:
        store.add(name, peft_dirs[name][0])
    model = copy.deepcopy(base)
    table = SlotTable(model, AdapterCache(store, 10**8), n_slots=4, max_rank=8)
    names = ["experts-r4", BASE, "all-linear-r2", "experts-r2-rs", "qv-r4", "experts-r4"]
    slots = [table.activate(n) for n in names]
    with torch.no_grad():
        plain = base(IDS).logits
    for merged in (None, "experts-r4", "all-linear-r2"):
        if merged is not None:
            table.merge(merged)
        mixed = _logits(model, torch.tensor(slots))
        for i, name in enumerate(names):
            want = plain[i] if name == BASE else peft_dirs[name][1][i]
            torch.testing.assert_close(mixed[i], want, atol=1e-4, rtol=0)
    table.unmerge()
    torch.testing.assert_close(_logits(model, -1), plain, atol=1e-5, rtol=0)


def test_merge_unmerge_switch_round_trip(base, peft_dirs):
    model = copy.deepcopy(base)
    a = load_adapter(model, peft_dirs["experts-r4"][0])
    b = load_adapter(model, peft_dirs["all-linear-r2"][0])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    surgery.merge(model, a)
    torch.testing.assert_close(_logits(model, a), peft_dirs["experts-r4"][1], atol=1e-4,
                               rtol=0)
    experts = model.model.layers[0].mlp.experts.base.gate_up_proj
    assert (experts - before["model.layers.0.mlp.experts.base.gate_up_proj"]).abs().max() > 0
    surgery.switch(model, b)
    torch.testing.assert_close(_logits(model, b), peft_dirs["all-linear-r2"][1], atol=1e-4,
                               rtol=0)
    surgery.unmerge(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], atol=1e-6, rtol=0)
    plain = surgery.merge_and_unload(model, a)
    assert type(plain.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    with torch.no_grad():
        torch.testing.assert_close(plain(IDS).logits, peft_dirs["experts-r4"][1], atol=1e-4,
                                   rtol=0)


def test_trained_in_loratree_loads_in_peft(base, tmp_path):
    """loratree's all-linear on Qwen3-MoE adapts what PEFT's does (attention, router,
    fused experts with gate_up_proj at 2r); a few optimizer steps, saved, loaded by PEFT
    with equal logits."""
    model = copy.deepcopy(base)
    report = surgery.inject(model, LoraConfig(rank=2, alpha=4, targets=("all-linear",)))
    ref = _peft_model(base, r=2, lora_alpha=4, target_modules="all-linear")
    ours = {n.removesuffix(".weight") for n in report.layers}
    theirs = {n.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]
              for n, _ in ref.named_parameters() if ".lora_A." in n}
    peft_names = {n.replace(".base_layer", ".gate_up_proj") if n.endswith("base_layer")
                  else n + ".down_proj" if n.endswith("experts") else n for n in theirs}
    assert ours == {n.removesuffix(".weight") for n in peft_names}
    up = surgery.lora_layers(model)["model.layers.0.mlp.experts.gate_up_proj"]
    assert up.specs[0].rank == 4 and up.specs[0].alpha == 8
    opt = torch.optim.AdamW(surgery.adapter_parameters(model, 0), lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert up.lora_b[0].abs().max() > 0  # trained away from the zero start
    save_adapter(model, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, _logits(model, 0), atol=1e-5, rtol=0)


def _rewrite(src, dst, edit):
    dst.mkdir()
    tensors = edit(load_file(src / "adapter_model.safetensors"))
    save_file(tensors, dst / "adapter_model.safetensors", {"format": "pt"})
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())


def test_wrong_rank_names_the_parameter(base, peft_dirs, tmp_path):
    src = peft_dirs["experts-r4"][0]
    key = "base_model.model.model.layers.1.mlp.experts.base_layer.lora_"

    def double(t):  # gate_up_proj of layer 1 at rank 8 per expert
        t[key + "A.weight"] = torch.cat([t[key + "A.weight"]] * 2)
        t[key + "B.weight"] = torch.cat([t[key + "B.weight"]] * 2, dim=1)
        return t

    _rewrite(src, tmp_path / "bad", double)
    model = copy.deepcopy(base)
    with pytest.raises(ShapeMismatchError, match=r"parameter 'model\.layers\.1\.mlp\.experts"
                       r"\.gate_up_proj' has rank 8 per expert .*the config says 4"):
        load_adapter(model, tmp_path / "bad")
    assert not surgery.lora_layers(model)  # nothing changed

    def drop(t):
        return {k: v for k, v in t.items() if not k.startswith(key)}

    _rewrite(src, tmp_path / "missing", drop)
    with pytest.raises(MissingKeyError, match=r"layers\.1\.mlp\.experts\.gate_up_proj"):
        load_adapter(model, tmp_path / "missing")


def test_config_fields_round_trip(base, peft_dirs, tmp_path):
    adapter = read_adapter(peft_dirs["experts-r2-rs"][0])
    assert set(adapter.config.target_parameters) == {"down_proj", "gate.weight"}
    assert adapter.pending and not adapter.params  # which key is which needs the model
    model = copy.deepcopy(base)
    load_adapter(model, peft_dirs["experts-r2-rs"][0])
    save_adapter(model, tmp_path / "again")
    raw = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert sorted(raw["target_parameters"]) == ["experts.down_proj", "gate.weight"]
    assert raw["target_modules"] == ["o_proj"] and raw["use_rslora"] is True
    assert sorted(load_file(tmp_path / "again" / "adapter_model.safetensors")) == sorted(
        load_file(peft_dirs["experts-r2-rs"][0] / "adapter_model.safetensors"))


def test_dropout_on_parameters_is_refused(base):
    with pytest.raises(ValueError, match="dropout"):
        surgery.inject(copy.deepcopy(base), LoraConfig(dropout=0.1, targets=(),
                                                       target_parameters=("down_proj",)))
