"""Routing centroids written by training: base-model features, shared where prompts are."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch

from loratree import surgery
from loratree.config import LoraConfig
from loratree.models.chat import Example
from loratree.models.tiny import tiny_gpt2, tiny_llama
from loratree.surgery import features
from loratree.train.centroid import routing_prompts, save_centroid
from tests.conftest import randomize_slot


def _naive(model, prompts):
    """The reference: each prompt alone through the whole model, adapters off, its last
    hidden state averaged over the prompt and scaled to unit length."""
    out = []
    off = surgery.context(model).use(-1) if surgery.lora_layers(model) else nullcontext()
    with off:
        for p in prompts:
            h = model(input_ids=torch.tensor([p]), output_hidden_states=True).hidden_states[-1]
            out.append(torch.nn.functional.normalize(h[0].mean(0), dim=0))
    return torch.stack(out)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_prompt_features_are_the_base_models_mean_last_hidden_state(make):
    model = make(vocab=64)
    targets = ("q_proj", "v_proj") if make is tiny_llama else ("c_attn",)
    randomize_slot(model, surgery.inject(model, LoraConfig(rank=2, targets=targets)).slot)
    prompts = [[1, 5, 9], [7, 3, 3, 2, 8, 4], [11]]
    got = features.prompt_features(model, prompts, batch_size=2)  # padded batches
    torch.testing.assert_close(got, _naive(model, prompts), rtol=1e-5, atol=1e-5)


def _examples(prompts):
    return [Example(input_ids=[*p, 40, 41], labels=[-100] * len(p) + [40, 41])
            for p in prompts]


def test_jobs_on_the_same_prompts_share_one_feature_pass(tmp_path, monkeypatch):
    model = tiny_llama(vocab=64)
    calls = []
    real = features.prompt_features
    monkeypatch.setattr("loratree.train.centroid.prompt_features",
                        lambda m, p, **k: calls.append(len(p)) or real(m, p, **k))
    known = {}
    for name in "abcd":
        (tmp_path / name).mkdir()
    same = _examples([[1, 2], [3, 4, 5]])
    assert routing_prompts(same) == ((1, 2), (3, 4, 5))
    for name in ("a", "b"):
        save_centroid(model, tmp_path / name, same, known)
    save_centroid(model, tmp_path / "c", _examples([[9, 9]]), known)
    assert calls == [2, 1] and len(known) == 2
    a, b = (json.loads((tmp_path / n / "routing.json").read_text()) for n in ("a", "b"))
    assert a == b and a["n_prompts"] == 2
    want = torch.nn.functional.normalize(_naive(model, [[1, 2], [3, 4, 5]]).mean(0), dim=0)
    assert a["centroid"] == pytest.approx(want.tolist(), abs=1e-6)
    no_prompt = [Example(input_ids=[1, 2], labels=[1, 2])]
    assert save_centroid(model, tmp_path / "d", no_prompt) is None
