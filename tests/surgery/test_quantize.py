"""Quantizing a model, saving and loading it, QLoRA training, and merging out of NF4."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from loratree import surgery
from loratree.config import LoraConfig, QuantConfig
from loratree.errors import QuantizedBaseError, TargetError
from loratree.layers import NF4Linear
from loratree.models import load_base, random_tokens, save_model, tiny_llama
from loratree.ops import nf4


def _qlora(seed=0, rank=4):
    model = tiny_llama(seed=seed)
    surgery.quantize(model)
    surgery.inject(model, LoraConfig(rank=rank, alpha=2.0 * rank, targets=("all-linear",)))
    return model


def test_quantize_targets_linear_layers_only():
    model = tiny_llama()
    ids = random_tokens(128, 2, 8)
    before = model(ids).logits
    report = surgery.quantize(model)
    layers = surgery.nf4_layers(model)
    assert set(report.layers) == set(layers) and len(layers) == 2 * 7
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens,
                                                               nn.Embedding)
    after = model(ids).logits
    assert (after - before).abs().max() < 0.1 * before.abs().max()  # close, not equal
    assert report.quant_bytes < report.float_bytes / 6


def test_quantize_rules():
    model = tiny_llama()
    surgery.quantize(model, QuantConfig(exclude=("down_proj",)))
    assert not any(n.endswith("down_proj") for n in surgery.nf4_layers(model))
    again = surgery.quantize(model, QuantConfig(targets=("q_proj",)))
    assert again.layers == ()  # already NF4
    with pytest.raises(TargetError, match="match no"):
        surgery.quantize(model, QuantConfig(targets=("no_such",)))
    with pytest.raises(TargetError, match="only nn"):
        surgery.quantize(tiny_llama(), QuantConfig(targets=("embed_tokens",)))
    adapted = tiny_llama()
    surgery.inject(adapted, LoraConfig())
    with pytest.raises(TargetError, match="before adding adapters"):
        surgery.quantize(adapted)
    with pytest.raises(ValueError, match="block"):
        QuantConfig(block=48)


def test_saved_quantized_base_loads_with_identical_logits(tmp_path):
    model = tiny_llama()
    surgery.quantize(model)
    out = save_model(model, None, tmp_path / "q")
    spec = json.loads((out / "quantization.json").read_text())
    assert spec["format"] == "loratree-nf4" and len(spec["modules"]) == 14
    loaded, tok = load_base(out)
    assert tok is None
    ids = random_tokens(128, 2, 8)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    for name, layer in surgery.nf4_layers(loaded).items():
        ref = surgery.nf4_layers(model)[name]
        assert torch.equal(layer.weight_nf4, ref.weight_nf4)


def test_tied_embeddings_survive_save_and_load(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    surgery.quantize(model)
    loaded, _ = load_base(save_model(model, None, tmp_path / "tied"))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = random_tokens(64, 1, 6)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("damage", ["spec", "weights", "shape"])
def test_bad_quantized_dirs_give_clear_errors(tmp_path, damage):
    model = tiny_llama()
    surgery.quantize(model)
    out = save_model(model, None, tmp_path / "q")
    if damage == "spec":
        (out / "quantization.json").write_text("{not json")
    elif damage == "weights":
        (out / "model.safetensors").write_bytes(b"\x00" * 40)
    else:
        spec = json.loads((out / "quantization.json").read_text())
        name = next(iter(spec["modules"]))
        spec["modules"][name]["double"] = False  # absmax then has the wrong dtype/shape
        (out / "quantization.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError):
        load_base(out)


def test_qlora_gradients_flow_and_loss_falls():
    torch.manual_seed(0)
    model = _qlora()
    model.train()
    params = list(surgery.adapter_parameters(model, 0))
    assert all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in model.named_parameters()
                   if "lora_" not in n)
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = random_tokens(128, 4, 16, seed=1)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    grads = [p.grad for p in params]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert losses[-1] < losses[0] - 0.05, losses


def _fill_adapter(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in surgery.adapter_parameters(model, 0):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_export_float_equals_unmerged_qlora_model():
    model = _qlora()
    _fill_adapter(model)
    ids = random_tokens(128, 2, 8)
    with torch.no_grad():
        before = model(ids).logits
    with pytest.raises(QuantizedBaseError):
        surgery.merge(model, 0)
    report = surgery.export_merged(model, 0, to="float")
    assert not surgery.lora_layers(model) and not surgery.nf4_layers(model)
    assert report.layers == 14 and report.max_abs == 0.0  # fp32 keeps the float merge exactly
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=1e-4, rtol=0)


def test_export_nf4_reports_the_requantization_error():
    model = _qlora()
    _fill_adapter(model)
    layers = surgery.lora_layers(model)
    name = next(iter(layers))
    float_merge = layers[name].base.dequantize() + layers[name].delta_weight(0)
    report = surgery.export_merged(model, 0, to="nf4")
    assert not surgery.lora_layers(model) and len(surgery.nf4_layers(model)) == 14
    kept = surgery.nf4_layers(model)[name].dequantize()
    err = (kept - float_merge).abs()
    assert 0 < err.max().item() <= report.max_abs
    assert 0 < report.mean_abs < report.max_abs
    # a fresh NF4 rounding of the float merge, so the error stays within one code step
    q = nf4.quantize(float_merge)
    assert torch.equal(nf4.dequantize(q), kept)


def test_nf4linear_moves_with_the_model():
    layer = NF4Linear.from_linear(nn.Linear(64, 8))
    sd = layer.state_dict()
    assert sd["weight_nf4"].dtype == torch.uint8
    layer2 = NF4Linear(64, 8, block=64, double=True)
    layer2.load_state_dict(sd)
    x = torch.randn(2, 64)
    assert torch.equal(layer(x), layer2(x))


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_peak_memory_of_quantizing_and_of_a_qlora_step():
    """The float model is never materialised a second time: peaks measured as RSS."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "tests.surgery.qlora_memory"], env=env,
                         capture_output=True, text=True, check=True, timeout=300)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    # quantizing frees each float layer as it goes: at most one layer's worth on top
    assert m["quantize_peak_over_float_model"] <= m["layer_bytes"], m
    # a QLoRA step: everything it holds stays below the float model plus one layer
    assert m["step_peak_over_baseline"] <= m["float_bytes"] + m["layer_bytes"], m
