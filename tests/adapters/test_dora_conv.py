"""DoRA on ``nn.Conv1d`` / ``nn.Conv2d`` against PEFT 0.21.2, on a small conv net built in
code (``TinyConvNet``: Conv1d with kernel 3, Conv2d with a (1, 3) kernel, a Linear): PEFT's
files load with PEFT's outputs, alone and in per-row mixed batches with plain LoRA adapters
and the base; merge and unmerge; a DoRA adapter trained here loads in PEFT; PEFT's
magnitude shapes, and a wrong one refused naming the key."""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from loratree import surgery
from loratree.adapters import load_adapter, save_adapter
from loratree.adapters.files import read_adapter
from loratree.config import LoraConfig
from loratree.errors import ShapeMismatchError
from loratree.models.tiny import random_tokens, tiny_convnet

CONV = ["conv1d", "conv2d"]
ADAPTERS = {  # name: (targets, r, alpha, use_dora)
    "dora-conv-r4": (CONV, 4, 8, True),
    "dora-all-r2": ([*CONV, "proj"], 2, 3, True),
    "lora-conv-r2": (CONV, 2, 4, False),
    "lora-all-r8": ([*CONV, "proj"], 8, 16, False),
}
MAG = "base_model.model.{}.lora_magnitude_vector"


def _peft_made(path, targets, r, alpha, dora, seed, dropout=0.0):
    """A PEFT model on TinyConvNet with random A, B and a magnitude away from the norm."""
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_dora=dora,
                          lora_dropout=dropout)
    model = peft.get_peft_model(tiny_convnet(), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "lora_magnitude_vector" in n:
                p.mul_(0.5 + torch.rand(p.shape, generator=g))
    model.save_pretrained(path)
    return model.eval()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """name -> (its directory, PEFT's model)."""
    root = tmp_path_factory.mktemp("conv")
    return {name: (root / name, _peft_made(root / name, *spec, seed=i))
            for i, (name, spec) in enumerate(ADAPTERS.items())}


def _ids(rows, t=8, seed=0):
    return random_tokens(128, rows, t, seed=seed)


def _loaded(made):
    model = tiny_convnet()
    for i, name in enumerate(ADAPTERS):
        assert load_adapter(model, made[name][0]) == i
    return model


def _run(model, index, ids, grad=False):
    with torch.set_grad_enabled(grad), surgery.context(model).use(index):
        return model(ids).detach()


def test_peft_files_have_conv_magnitude_shapes_and_load_with_peft_outputs(made):
    path, theirs = made["dora-all-r2"]
    tensors = load_file(path / "adapter_model.safetensors")
    assert tuple(tensors[MAG.format("conv1d")].shape) == (1, 16, 1)
    assert tuple(tensors[MAG.format("conv2d")].shape) == (1, 16, 1, 1)
    assert tuple(tensors[MAG.format("proj")].shape) == (16,)
    ids = _ids(3)
    for name in ("dora-conv-r4", "dora-all-r2"):
        path, theirs = made[name]
        ours = tiny_convnet()
        assert load_adapter(ours, path) == 0
        with torch.no_grad():
            want = theirs(ids)
            assert (want - tiny_convnet()(ids)).abs().max() > 1e-2
            torch.testing.assert_close(ours(ids), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("rows", [[0, 1, 2, 3, -1, 1, 0, 3], [0, 0, 1, 1, 2, 2, 3, 3, -1]])
def test_mixed_batch_rows_each_equal_peft_alone(made, rows, grad):
    """Conv layers take a slot per row: two DoRA adapters, two plain LoRA ones and the base
    in one forward, every row equal to PEFT's output with that adapter alone."""
    model = _loaded(made)
    names = list(ADAPTERS)
    ids = _ids(len(rows), seed=1)
    got = _run(model, torch.tensor(rows), ids, grad)
    base = tiny_convnet()
    with torch.no_grad():
        for row, slot in enumerate(rows):
            ref = made[names[slot]][1] if slot >= 0 else base
            torch.testing.assert_close(got[row], ref(ids[row:row + 1])[0], atol=1e-5,
                                       rtol=0, msg=f"row {row} (slot {slot})")


def test_merge_gives_peft_outputs_and_unmerge_restores_the_base(made):
    model = _loaded(made)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base" in n}
    ids = _ids(4, seed=2)
    rows = torch.tensor([0, 2, -1, 1])
    mixed = _run(model, rows, ids)
    for slot in (0, 1):  # both DoRA adapters
        surgery.switch(model, slot)
        want = made[list(ADAPTERS)[slot]][1]
        with torch.no_grad():
            torch.testing.assert_close(_run(model, slot, ids), want(ids), atol=1e-5, rtol=0)
        torch.testing.assert_close(_run(model, -1, ids), tiny_convnet()(ids).detach(),
                                   atol=1e-5, rtol=0)  # the base through a merged DoRA slot
        torch.testing.assert_close(_run(model, rows, ids), mixed, atol=1e-5, rtol=0)
    surgery.switch(model, 3)  # DoRA -> plain LoRA: unmerge, then merge
    surgery.unmerge(model)
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p.detach(), weights[n], atol=1e-6, rtol=0, msg=n)


def test_gradients_equal_peft_training_forward(made):
    path, _ = made["dora-all-r2"]
    theirs = peft.PeftModel.from_pretrained(tiny_convnet(), path, is_trainable=True).train()
    ours = tiny_convnet()
    load_adapter(ours, path, trainable=True)
    ours.train()
    ids = _ids(2, seed=3)
    for m in (theirs, ours):
        m(ids).pow(2).mean().backward()
    grads = {n.removeprefix("base_model.model."): p.grad for n, p in theirs.named_parameters()
             if p.requires_grad}
    for name, layer in surgery.lora_layers(ours).items():
        for mine, key in ((layer.lora_a[0], "lora_A.default.weight"),
                          (layer.lora_b[0], "lora_B.default.weight"),
                          (layer.lora_magnitude["0"], "lora_magnitude_vector.default.weight")):
            want = grads[f"{name}.{key}"]
            torch.testing.assert_close(mine.grad, want.reshape(mine.shape), atol=1e-6,
                                       rtol=1e-4, msg=f"{name} {key}")


def test_training_forward_with_dropout_equals_peft_with_the_same_masks(tmp_path):
    """PEFT's arrangement with dropout; the per-row path gives the one-slot path's output
    (on a contiguous input the same masks are drawn; TinyConvNet feeds conv1d a transposed,
    strided input, on which a gathered copy draws its mask in another order)."""
    theirs = _peft_made(tmp_path / "d", CONV, 4, 8, True, seed=5, dropout=0.3).train()
    ours = tiny_convnet()
    load_adapter(ours, tmp_path / "d")
    ours.train()
    ids = _ids(2, seed=4)
    torch.manual_seed(7)
    want = theirs(ids)
    torch.manual_seed(8)
    assert (theirs(ids) - want).abs().max() > 1e-3  # the dropout does something
    torch.manual_seed(7)
    with surgery.context(ours).use(0):
        torch.testing.assert_close(ours(ids), want, atol=1e-5, rtol=0)
    ctx = surgery.context(ours)
    for name, shape in (("conv1d", (2, 16, 8)), ("conv2d", (2, 16, 1, 8))):
        layer, x = surgery.lora_layers(ours)[name], torch.randn(shape)
        outs = []
        for index in (0, torch.tensor([0, 0]), torch.tensor([-1, 0])):
            torch.manual_seed(3)
            with ctx.use(index):
                outs.append(layer(x))
        torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=0, msg=name)
        torch.testing.assert_close(outs[2][0], layer.base(x)[0], atol=1e-6, rtol=0, msg=name)


def test_trained_by_loratree_loads_in_peft_with_equal_outputs(tmp_path):
    """A few optimizer steps on a fresh DoRA adapter (magnitude, A and B trained), saved
    in PEFT's format and loaded by PEFT."""
    model = tiny_convnet()
    surgery.inject(model, LoraConfig(rank=4, alpha=8, targets=(*CONV, "proj"), use_dora=True))
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 9  # A, B and magnitude of three layers
    opt = torch.optim.Adam(params, lr=1e-2)
    ids = _ids(4, seed=5)
    model.train()
    for _ in range(3):
        torch.nn.functional.cross_entropy(model(ids)[:, :-1].reshape(-1, 128),
                                          ids[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["use_dora"]
    adapter = read_adapter(tmp_path / "a")
    assert tuple(adapter.magnitudes["conv2d"].shape) == (1, 16, 1, 1)
    norm = tiny_convnet().conv2d.weight.detach().flatten(1).norm(dim=1)
    assert (adapter.magnitudes["conv2d"].flatten() - norm).abs().max() > 1e-3  # trained
    theirs = peft.PeftModel.from_pretrained(tiny_convnet(), tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(_run(model, 0, ids), theirs(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad", [(16,), (1, 16, 1), (1, 8, 1, 1)])
def test_wrong_magnitude_shape_is_refused_naming_the_key(made, tmp_path, bad):
    import shutil

    path = shutil.copytree(made["dora-conv-r4"][0], tmp_path / "bad")
    f = path / "adapter_model.safetensors"
    tensors = load_file(f)
    tensors[MAG.format("conv2d")] = torch.ones(bad)
    save_file(tensors, f)
    with pytest.raises(ShapeMismatchError, match=r"conv2d\.lora_magnitude_vector"):
        load_adapter(tiny_convnet(), path)


def test_set_slot_takes_peft_magnitude_shapes(made):
    """The serving path (``SlotTable`` calls ``set_slot`` with the file's tensors): a plain
    LoRA slot replaced by the DoRA adapter, magnitudes in PEFT's conv shapes, gives PEFT's
    output; a magnitude of another shape is refused naming the layer."""
    from loratree.layers import SlotSpec

    model = tiny_convnet()
    load_adapter(model, made["lora-conv-r2"][0])
    path, theirs = made["dora-conv-r4"]
    adapter = read_adapter(path)
    layers = surgery.lora_layers(model)
    spec = SlotSpec(rank=4, alpha=8, dora=True)
    for name, (a, b) in adapter.weights.items():
        layers[name].set_slot(0, spec, a, b, adapter.magnitudes[name])
    ids = _ids(2, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(_run(model, torch.tensor([0, 0]), ids), theirs(ids),
                                   atol=1e-5, rtol=0)
    a, b = adapter.weights["conv1d"]
    with pytest.raises(ValueError, match=r"conv1d.*\(1, 16, 1\)"):
        layers["conv1d"].set_slot(0, spec, a, b, torch.ones(1, 1, 16))
