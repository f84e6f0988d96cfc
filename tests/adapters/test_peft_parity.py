"""Same weights, same logits as PEFT; files move both ways between PEFT and loratree."""

import copy

import peft
import pytest
import torch

from loratree import surgery
from loratree.adapters import load_adapter, save_adapter
from loratree.config import LoraConfig
from loratree.models.tiny import tiny_convnet, tiny_gpt2, tiny_llama
from tests.conftest import randomize_slot

CASES = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj", "embed_tokens"], "CAUSAL_LM"),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], "CAUSAL_LM"),
    "convnet": (tiny_convnet, ["embed", "conv1d", "conv2d", "proj"], None),
}


def _logits(m, ids):
    out = m(ids)
    return out.logits if hasattr(out, "logits") else out


def _ours(kind, rslora=False):
    build, targets, _ = CASES[kind]
    base = build()
    m = copy.deepcopy(base)
    surgery.inject(m, LoraConfig(rank=4, alpha=6, targets=tuple(targets), use_rslora=rslora))
    randomize_slot(m, 0)
    return base, m


def _peft(kind, base, rslora=False):
    _, targets, task = CASES[kind]
    cfg = peft.LoraConfig(
        r=4, lora_alpha=6, target_modules=targets, task_type=task, use_rslora=rslora,
        fan_in_fan_out=kind == "gpt2",
    )
    return peft.get_peft_model(copy.deepcopy(base), cfg).eval()


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("kind", list(CASES))
def test_same_weights_give_peft_logits(kind, rslora):
    base, ours = _ours(kind, rslora)
    theirs = _peft(kind, base, rslora)
    named = dict(theirs.named_modules())
    with torch.no_grad():
        for name, layer in surgery.lora_layers(ours).items():
            module = named[f"base_model.model.{name}"]
            if hasattr(module, "lora_embedding_A") and module.lora_embedding_A:
                module.lora_embedding_A["default"].copy_(layer.lora_a[0])
                module.lora_embedding_B["default"].copy_(layer.lora_b[0])
            else:
                module.lora_A["default"].weight.copy_(layer.lora_a[0])
                module.lora_B["default"].weight.copy_(layer.lora_b[0])
    ids = torch.randint(0, 128, (3, 8))
    ref = _logits(theirs, ids)
    assert (ref - _logits(base, ids)).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(_logits(ours, ids), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", list(CASES))
def test_our_file_loads_in_peft_with_equal_logits(kind, tmp_path):
    base, ours = _ours(kind)
    save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    ids = torch.randint(0, 128, (2, 8))
    torch.testing.assert_close(_logits(theirs, ids), _logits(ours, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", list(CASES))
def test_peft_file_loads_in_loratree_with_equal_logits(kind, tmp_path):
    base, _ = _ours(kind)
    theirs = _peft(kind, base)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path / "p")
    ours = copy.deepcopy(base)
    assert load_adapter(ours, tmp_path / "p") == 0
    ids = torch.randint(0, 128, (2, 8))
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=1e-5, rtol=0)


def test_per_layer_ranks_round_trip_through_rank_pattern(tmp_path):
    base = tiny_llama()
    ours = copy.deepcopy(base)
    cfg = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"),
                     rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 3.0})
    surgery.inject(ours, cfg)
    randomize_slot(ours, 0)
    save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    again = copy.deepcopy(base)
    load_adapter(again, tmp_path / "a")
    ids = torch.randint(0, 128, (2, 8))
    torch.testing.assert_close(_logits(theirs, ids), _logits(ours, ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(again, ids), _logits(ours, ids), atol=1e-6, rtol=0)
