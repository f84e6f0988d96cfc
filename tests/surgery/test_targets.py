import pytest
import torch

from loratree import surgery
from loratree.config import LoraConfig
from loratree.errors import TargetError
from loratree.models.tiny import tiny_convnet, tiny_gpt2, tiny_llama


def _names(model, *targets, exclude=()):
    return list(surgery.find_targets(model, targets, exclude))


def test_suffix_glob_regex_type_and_all_linear():
    m = tiny_llama()
    q = _names(m, "q_proj")
    assert q == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert _names(m, "model.layers.1.self_attn.q_proj") == q[1:]
    assert _names(m, "model.layers.*.mlp.*") == [
        f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")
    ]
    assert _names(m, r"re:model\.layers\.0\.self_attn\.[kv]_proj") == [
        "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
    ]
    assert _names(m, "type:Embedding") == ["model.embed_tokens"]
    all_linear = _names(m, "all-linear")
    assert len(all_linear) == 14 and "lm_head" not in all_linear
    assert _names(m, "all-linear", exclude=("*mlp*",)) == [n for n in all_linear if "mlp" not in n]


def test_gpt2_conv1d_and_convnet_layers_are_found():
    assert len(_names(tiny_gpt2(), "all-linear")) == 8  # c_attn, c_proj, c_fc, c_proj x 2
    assert _names(tiny_convnet(), "embed", "conv1d", "conv2d", "proj") == [
        "embed", "conv1d", "conv2d", "proj",
    ]


def test_a_pattern_that_matches_nothing_is_named():
    with pytest.raises(TargetError, match="no_such"):
        surgery.inject(tiny_llama(), LoraConfig(targets=("q_proj", "no_such")))


def test_inject_freezes_everything_but_the_adapter_and_reports():
    m = tiny_llama()
    report = surgery.inject(m, LoraConfig(rank=4, targets=("q_proj", "v_proj")))
    assert report.layers == tuple(_names(m, "q_proj", "v_proj")) or len(report.layers) == 4
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert report.trainable_params == sum(p.numel() for p in surgery.adapter_parameters(m, 0))
    # q: A (4, 32) + B (32, 4); v: A (4, 32) + B (16, 4) (2 kv heads x 8) per layer
    assert report.trainable_params == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)
    assert "4 layers" in str(report)


def test_fresh_adapter_leaves_logits_exactly_unchanged():
    m = tiny_llama()
    ids = torch.randint(0, 128, (2, 9))
    before = m(ids).logits
    surgery.inject(m, LoraConfig(rank=8, targets=("all-linear", "embed_tokens")))
    assert torch.equal(m(ids).logits, before)
