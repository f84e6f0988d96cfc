"""PEFT's ``lora_bias`` (B carries a bias; branch = s * (B A x + b)): PEFT's files load with
PEFT's logits, per row in mixed batches on every strategy, merge and switch, files we
train load in PEFT, bad files get typed errors naming the key."""

import copy
import json
import shutil

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from loratree import surgery
from loratree.adapters import load_adapter, save_adapter
from loratree.config import LoraConfig
from loratree.errors import (
    AdapterConfigError,
    MergeError,
    MissingKeyError,
    NonFiniteError,
    ShapeMismatchError,
    UnexpectedKeyError,
)
from tests.adapters.extras_common import (
    LAYOUTS,
    PLAIN,
    biased_llama,
    loaded,
    made_adapters,
    mixed,
    peft_made,
    random_ids,
    solo,
    tiny_llama,
)

BIAS = {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4, "lora_alpha": 6,
        "lora_bias": True}
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The base, and PEFT adapters: slot 0 with lora_bias, 1..3 plain LoRA."""
    root = tmp_path_factory.mktemp("bias")
    base = biased_llama()
    return base, made_adapters(root, base, BIAS, PLAIN, seed=10)


def test_peft_file_has_bias_keys_and_loads_with_peft_logits(made):
    base, paths = made
    keys = load_file(str(paths[0] / "adapter_model.safetensors"))
    assert f"{Q0}.lora_B.bias" in keys and keys[f"{Q0}.lora_B.bias"].abs().sum() > 0
    ids = random_ids(3, 8)
    ours = copy.deepcopy(base)
    load_adapter(ours, paths[0])
    with torch.no_grad():
        got = ours(ids).logits
    ref = solo(base, paths[0], ids)
    assert (ref - solo(base, None, ids)).abs().max() > 1e-3
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    # the bias matters: without it the logits differ
    layer = surgery.lora_layers(ours)["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        layer.lora_bias[0].zero_()
        assert (ours(ids).logits - ref).abs().max() > 1e-4


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_mixed_batch_rows_equal_peft_solo(made, layout, grad):
    base, paths = made
    model = loaded(base, paths)
    rows, length = LAYOUTS[layout]
    ids = random_ids(len(rows), length, seed=3)
    got = mixed(model, rows, ids, grad=grad)
    refs = {s: solo(base, paths[s] if s >= 0 else None, ids) for s in set(rows)}
    for i, s in enumerate(rows):
        torch.testing.assert_close(got[i], refs[s][i], atol=1e-4, rtol=0)


def test_mixed_batch_with_the_bias_adapter_merged(made):
    base, paths = made
    model = loaded(base, paths)
    surgery.merge(model, 0)
    rows, length = LAYOUTS["prefill-gather"]
    ids = random_ids(len(rows), length, seed=4)
    got = mixed(model, rows, ids)
    for i, s in enumerate(rows):
        ref = solo(base, paths[s] if s >= 0 else None, ids[i:i + 1])[0]
        torch.testing.assert_close(got[i], ref, atol=1e-4, rtol=0)


def test_merge_unmerge_and_switch_round_trip(made):
    base, paths = made
    model = loaded(base, paths)
    ids = random_ids(2, 8, seed=5)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    ctx = surgery.context(model)
    with torch.no_grad(), ctx.use(0):
        unmerged = model(ids).logits
    surgery.merge(model, 0)
    q = surgery.lora_layers(model)["model.layers.0.self_attn.q_proj"]
    assert not torch.equal(q.base.bias, before["model.layers.0.self_attn.q_proj.bias"])
    with torch.no_grad(), ctx.use(0):
        torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-4, rtol=0)
    for target in (1, 0, 2, 0):  # switch across plain and bias adapters
        surgery.switch(model, target)
        with torch.no_grad(), ctx.use(target):
            torch.testing.assert_close(model(ids).logits, solo(base, paths[target], ids),
                                       atol=1e-4, rtol=0)
    surgery.unmerge(model)
    after = {n.replace(".base.", "."): p for n, p in model.named_parameters()
             if "lora_" not in n}
    for name, p in before.items():
        torch.testing.assert_close(after[name], p, atol=1e-5, rtol=0)


def test_merge_needs_a_base_bias(tmp_path):
    base = tiny_llama()  # no biases
    peft_made(base, tmp_path / "a", seed=1, **BIAS)
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path / "a")
    ids = random_ids(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, solo(base, tmp_path / "a", ids),
                                   atol=1e-4, rtol=0)
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(MergeError, match=r"q_proj.*the base layer has none"):
        surgery.merge(model, 0)
    for n, p in model.named_parameters():  # all or nothing
        assert torch.equal(p, w[n]), n


def test_trained_by_loratree_loads_in_peft_with_equal_logits(tmp_path):
    base = biased_llama()
    model = copy.deepcopy(base)
    surgery.inject(model, LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"),
                                     lora_bias=True))
    params = list(surgery.adapter_parameters(model, 0))
    assert sum(p.dim() == 1 for p in params) == 6  # a bias per adapted layer
    opt = torch.optim.Adam(params, lr=1e-2)
    ids = random_ids(4, 10, seed=6)
    model.train()
    for _ in range(4):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    layer = surgery.lora_layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.lora_bias[0].abs().sum() > 0  # the bias trained
    save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert theirs.peft_config["default"].lora_bias
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids).logits, atol=1e-4, rtol=0)


def _rewrite(path, edit):
    f = path / "adapter_model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f))


@pytest.mark.parametrize(("edit", "error", "match"), [
    (lambda t: t.__setitem__(f"{Q0}.lora_B.bias", torch.zeros(31)), ShapeMismatchError,
     r"q_proj\.lora_B\.bias"),
    (lambda t: t.__setitem__(f"{Q0}.lora_B.bias", torch.full((32,), float("nan"))),
     NonFiniteError, r"q_proj\.lora_B\.bias"),
    (lambda t: t.pop(f"{Q0}.lora_B.bias"), MissingKeyError, r"q_proj\.lora_B\.bias"),
    (lambda t: t.__setitem__(f"{Q0}.lora_A.bias", torch.zeros(4)), UnexpectedKeyError,
     r"q_proj\.lora_A\.bias"),
], ids=["shape", "nan", "missing", "bias-of-A"])
def test_bad_bias_files_get_typed_errors_naming_the_key(made, tmp_path, edit, error, match):
    base, paths = made
    bad = shutil.copytree(paths[0], tmp_path / "bad")
    _rewrite(bad, edit)
    model = copy.deepcopy(base)
    with pytest.raises(error, match=match):
        load_adapter(model, bad)
    assert not surgery.lora_layers(model)


def test_a_bias_without_lora_bias_in_the_config_is_refused(made, tmp_path):
    base, paths = made
    bad = shutil.copytree(paths[1], tmp_path / "bad")  # plain: no lora_bias
    _rewrite(bad, lambda t: t.__setitem__(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", torch.zeros(32)))
    with pytest.raises(UnexpectedKeyError, match=r"q_proj\.lora_B\.bias.*lora_bias"):
        load_adapter(copy.deepcopy(base), bad)


def test_dora_with_lora_bias_is_refused_as_peft_refuses_it(made, tmp_path):
    """PEFT 0.21.2's LoraConfig refuses ``use_dora`` with ``lora_bias``; so do we, in our
    config and in a file's config (a hand-edited one: PEFT never writes the pair)."""
    with pytest.raises(ValueError, match="lora_bias=True is not supported for DoRA"):
        peft.LoraConfig(use_dora=True, lora_bias=True)
    with pytest.raises(ValueError, match="use_dora and lora_bias cannot be combined"):
        LoraConfig(rank=2, alpha=4, use_dora=True, lora_bias=True)
    base, paths = made
    bad = shutil.copytree(paths[0], tmp_path / "bad")
    raw = json.loads((bad / "adapter_config.json").read_text())
    raw["use_dora"] = True
    (bad / "adapter_config.json").write_text(json.dumps(raw))
    model = copy.deepcopy(base)
    with pytest.raises(AdapterConfigError, match="use_dora and lora_bias"):
        load_adapter(model, bad)
    assert not surgery.lora_layers(model)
