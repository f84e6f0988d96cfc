"""Tiny models: deterministic per seed, every layer on the forward path, PEFT accepts them."""

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from loratree.models import random_tokens, tiny_convnet, tiny_gpt2, tiny_llama

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "convnet": tiny_convnet}


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_same_seed_same_weights_other_seed_other_weights(kind):
    build = BUILDERS[kind]
    a, b, c = _state(build(seed=3)), _state(build(seed=3)), _state(build(seed=4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_forward_gives_float32_logits_in_eval_mode(kind):
    model = BUILDERS[kind]()
    ids = random_tokens(128, batch=2, seq=7, seed=0)
    with torch.no_grad():
        logits = _logits(model, ids)
    assert not model.training
    assert logits.shape == (2, 7, 128) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_building_leaves_the_global_rng_alone(kind):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    BUILDERS[kind](seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_llama_uses_grouped_query_attention():
    model = tiny_llama(hidden=32, heads=4, kv_heads=2)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features == 32 and attn.k_proj.out_features == 16  # 2 kv heads x 8
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_gpt2_uses_transformers_conv1d():
    block = tiny_gpt2().transformer.h[0]
    for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
        assert isinstance(layer, Conv1D)


def test_convnet_has_every_layer_kind_on_the_forward_path():
    model = tiny_convnet()
    kinds = {name: type(m) for name, m in model.named_children()}
    assert kinds == {
        "embed": nn.Embedding, "conv1d": nn.Conv1d, "conv2d": nn.Conv2d,
        "proj": nn.Linear, "head": nn.Linear,
    }
    ids = random_tokens(128, batch=2, seq=5, seed=1)
    model(ids).square().sum().backward()
    for name, _ in kinds.items():
        grad = getattr(model, name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_convnet_treats_batch_rows_independently():
    model = tiny_convnet()
    ids = random_tokens(128, batch=3, seq=9, seed=2)
    with torch.no_grad():
        whole = model(ids)
        rows = torch.cat([model(ids[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(whole, rows)


def test_peft_wraps_the_convnet_without_a_task_type():
    base = tiny_convnet()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed", "conv2d", "proj"])
    wrapped = peft.get_peft_model(tiny_convnet(), cfg)
    wrapped_names = {n for n, m in wrapped.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped_names == {
        "base_model.model.embed", "base_model.model.conv2d", "base_model.model.proj"
    }
    ids = random_tokens(128, batch=2, seq=6, seed=3)
    with torch.no_grad():  # a fresh LoRA is a no-op (one factor starts at zero)
        torch.testing.assert_close(wrapped(ids), base(ids))


def test_random_tokens_are_reproducible_and_in_range():
    a = random_tokens(50, batch=4, seq=16, seed=9)
    assert a.shape == (4, 16) and a.dtype == torch.int64
    assert int(a.min()) >= 0 and int(a.max()) < 50
    assert torch.equal(a, random_tokens(50, batch=4, seq=16, seed=9))
    assert not torch.equal(a, random_tokens(50, batch=4, seq=16, seed=10))
