"""DoRA against PEFT 0.21.2: PEFT's files load with PEFT's logits, alone and in mixed batches
with plain LoRA adapters and the base; merge and unmerge; our trained DoRA loads in PEFT."""

import copy
import json

import peft
import pytest
import torch

from loratree import surgery
from loratree.adapters import load_adapter, save_adapter
from loratree.adapters.files import read_adapter
from loratree.config import LoraConfig
from loratree.errors import MissingKeyError, NonFiniteError, ShapeMismatchError
from loratree.models.tiny import tiny_gpt2, tiny_llama, tiny_tokenizer

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # name: (targets, r, alpha, use_dora)
    "dora-qv-r4": (["q_proj", "v_proj"], 4, 8, True),
    "dora-all-r2": (ALL, 2, 3, True),
    "lora-r2": (["q_proj", "v_proj", "down_proj"], 2, 4, False),
    "lora-all-r8": (ALL, 8, 16, False),
}


def _randomize(model, seed):
    """Nonzero A and B, and a magnitude away from the norm (PEFT starts it at the norm)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "lora_magnitude_vector" in n:
                p.mul_(0.5 + torch.rand(p.shape, generator=g))


def _peft_made(path, build, targets, r, alpha, dora, seed, fan_in_fan_out=False):
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_dora=dora,
                          task_type="CAUSAL_LM", fan_in_fan_out=fan_in_fan_out)
    model = peft.get_peft_model(build(), cfg)
    _randomize(model, seed)
    model.save_pretrained(path)
    return model.eval()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Each adapter made and saved by PEFT; name -> (its directory, PEFT's model)."""
    root = tmp_path_factory.mktemp("peft")
    return {name: (root / name, _peft_made(root / name, tiny_llama, *spec, seed=i))
            for i, (name, spec) in enumerate(ADAPTERS.items())}


def _ids(rows, t):
    return torch.randint(0, 128, (rows, t), generator=torch.Generator().manual_seed(t))


def test_peft_dora_files_load_with_peft_logits(made, tmp_path):
    ids = _ids(3, 8)
    for name in ("dora-qv-r4", "dora-all-r2"):
        path, theirs = made[name]
        assert json.loads((path / "adapter_config.json").read_text())["use_dora"] is True
        ours = tiny_llama()
        assert load_adapter(ours, path) == 0
        with torch.no_grad():
            want = theirs(ids).logits
            assert (want - tiny_llama()(ids).logits).abs().max() > 1e-2
            torch.testing.assert_close(ours(ids).logits, want, atol=1e-4, rtol=0)
    # GPT-2's Conv1D: fan_in_fan_out and a bias (the bias keeps its scale)
    theirs = _peft_made(tmp_path / "g", tiny_gpt2, ["c_attn", "c_proj", "c_fc"], 4, 8, True,
                        seed=9, fan_in_fan_out=True)
    ours = tiny_gpt2()
    load_adapter(ours, tmp_path / "g")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-4, rtol=0)


def _mixed_model(made):
    model = tiny_llama()
    for i, name in enumerate(ADAPTERS):
        assert load_adapter(model, made[name][0]) == i
    return model


ORDERS = {  # rows' slots (-1: the base)
    "interleaved": [0, 1, 2, 3, -1, 1, 0, 3],
    "sorted": [0, 0, 1, 1, 2, 2, 3, 3],
}


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("t", [4, 12])  # 4: a gathered batch; 12: past GATHER_MAX_TOKENS
@pytest.mark.parametrize("order", list(ORDERS))
def test_mixed_batch_rows_each_equal_peft_alone(made, order, t, grad):
    model = _mixed_model(made)
    names = list(ADAPTERS)
    slots = ORDERS[order]
    ids = _ids(len(slots), t)
    with torch.set_grad_enabled(grad), surgery.context(model).use(torch.tensor(slots)):
        got = model(ids).logits
    base = tiny_llama().eval()
    with torch.no_grad():
        for row, slot in enumerate(slots):
            ref = made[names[slot]][1] if slot >= 0 else base
            want = ref(ids[row:row + 1]).logits[0]
            torch.testing.assert_close(got[row].detach(), want, atol=1e-4, rtol=0,
                                       msg=f"row {row} (slot {slot})")


def test_merge_gives_peft_logits_and_unmerge_restores_the_base(made):
    model = _mixed_model(made)
    ids = _ids(4, 6)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base" in n}
    ctx = surgery.context(model)
    slots = [0, 2, -1, 1]
    with torch.no_grad(), ctx.use(torch.tensor(slots)):
        mixed = model(ids).logits
    base = tiny_llama().eval()
    for slot in (0, 1):  # both DoRA adapters
        theirs = made[list(ADAPTERS)[slot]][1]
        surgery.switch(model, slot)
        with torch.no_grad():
            with ctx.use(slot):
                torch.testing.assert_close(model(ids).logits, theirs(ids).logits, atol=1e-4,
                                           rtol=0)
            with ctx.use(-1):  # the base through a merged DoRA slot
                torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-4,
                                           rtol=0)
            with ctx.use(torch.tensor(slots)):
                torch.testing.assert_close(model(ids).logits, mixed, atol=1e-4, rtol=0)
    surgery.switch(model, 3)  # DoRA -> plain LoRA: unmerge, then merge
    surgery.unmerge(model)
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p.detach(), weights[n], atol=1e-5, rtol=0, msg=n)
    with torch.no_grad(), ctx.use(torch.tensor(slots)):
        torch.testing.assert_close(model(ids).logits, mixed, atol=1e-5, rtol=0)


def test_gradients_equal_peft_training_forward(made):
    path, _ = made["dora-qv-r4"]
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), path, is_trainable=True).train()
    ours = tiny_llama()
    load_adapter(ours, path, trainable=True)
    ours.train()
    ids = _ids(2, 6)
    for m in (theirs, ours):
        m(ids, labels=ids).loss.backward()
    grads = {n.removeprefix("base_model.model."): p.grad for n, p in theirs.named_parameters()
             if p.requires_grad}
    layers = surgery.lora_layers(ours)
    assert len(grads) == 3 * len(layers)
    for name, layer in layers.items():
        for ours_p, key in ((layer.lora_a[0], "lora_A.default.weight"),
                            (layer.lora_b[0], "lora_B.default.weight"),
                            (layer.lora_magnitude["0"], "lora_magnitude_vector.default.weight")):
            torch.testing.assert_close(ours_p.grad, grads[f"{name}.{key}"], atol=1e-5,
                                       rtol=1e-4, msg=f"{name} {key}")


def test_trained_by_loratree_loads_in_peft_with_equal_logits(tmp_path):
    from loratree.train import TrainConfig, train

    records = [{"prompt": f"w{i} w{i + 1}", "completion": f"w{i + 1} w{i}"} for i in range(5, 13)]
    model = tiny_llama(vocab=64)
    cfg = TrainConfig(out=str(tmp_path / "a"), max_steps=3, batch_size=4, lr=1e-2, rank=4,
                      alpha=8, dropout=0.1, targets=("q_proj", "v_proj", "down_proj"),
                      use_dora=True, eval_examples=0)
    train(cfg, model=model, tokenizer=tiny_tokenizer(64), rows=records, progress=False)
    adapter = read_adapter(tmp_path / "a")
    assert adapter.config.use_dora and len(adapter.magnitudes) == 6
    fresh = tiny_llama(vocab=64)
    norms = {n: m.weight.detach().norm(dim=1) for n, m in fresh.named_modules()
             if n in adapter.magnitudes}
    assert max((adapter.magnitudes[n] - norms[n]).abs().max() for n in norms) > 1e-3  # trained
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path / "a").eval()
    ids = torch.randint(0, 64, (3, 7))
    model.eval()
    with torch.no_grad(), surgery.context(model).use(0):
        torch.testing.assert_close(model(ids).logits, theirs(ids).logits, atol=1e-4, rtol=0)


def test_our_dora_file_loads_back_and_bad_magnitudes_are_refused(tmp_path):
    ours = tiny_llama()
    surgery.inject(ours, LoraConfig(rank=2, alpha=4, targets=("q_proj",), use_dora=True))
    save_adapter(ours, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["use_dora"]
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    assert tensors[key].shape == (32,)
    for bad, error in ((tensors[key][:5], ShapeMismatchError),
                       (torch.full((32,), float("nan")), NonFiniteError), (None, MissingKeyError)):
        broken = dict(tensors)
        if bad is None:
            del broken[key]
        else:
            broken[key] = bad
        save_file(broken, tmp_path / "a" / "adapter_model.safetensors")
        with pytest.raises(error, match="lora_magnitude_vector"):
            load_adapter(copy.deepcopy(ours), tmp_path / "a")


def test_training_forward_with_dropout_equals_peft_with_the_same_masks(tmp_path):
    theirs = _peft_made(tmp_path / "d", tiny_llama, ["q_proj", "v_proj", "up_proj"], 4, 8,
                        True, seed=3)
    theirs.peft_config["default"].lora_dropout = 0.3
    with torch.no_grad():  # PEFT's dropout modules were built from the saved config: rebuild
        for module in theirs.modules():
            if hasattr(module, "lora_dropout") and "default" in module.lora_dropout:
                module.lora_dropout["default"] = torch.nn.Dropout(0.3)
    raw = json.loads((tmp_path / "d" / "adapter_config.json").read_text())
    raw["lora_dropout"] = 0.3
    (tmp_path / "d" / "adapter_config.json").write_text(json.dumps(raw))
    ours = tiny_llama()
    load_adapter(ours, tmp_path / "d")
    theirs.train()
    ours.train()
    ids = _ids(2, 5)
    torch.manual_seed(7)
    want = theirs(ids).logits
    torch.manual_seed(7)
    assert (theirs(ids).logits - want).abs().max() < 1e-6  # same seed, same masks
    torch.manual_seed(8)
    assert (theirs(ids).logits - want).abs().max() > 1e-3  # the dropout does something
    for index in (0, torch.tensor([0, 0])):  # one slot: the dropout draws PEFT's masks
        torch.manual_seed(7)
        with surgery.context(ours).use(index):
            torch.testing.assert_close(ours(ids).logits, want, atol=1e-4, rtol=0,
                                       msg=f"index {index}")
    with torch.no_grad(), surgery.context(ours).use(torch.tensor([0, -1])):
        got = ours(ids).logits  # row 0 draws other masks; row 1 is the base
    torch.testing.assert_close(got[1], tiny_llama()(ids[1:]).logits[0], atol=1e-5, rtol=0)
