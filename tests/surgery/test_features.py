"""Pooled features through per-prompt slots: batched, padded and split as they may be, each
equals its prompt alone through its own slot."""

import torch

from loratree import surgery
from loratree.config import LoraConfig
from loratree.models.tiny import tiny_llama
from loratree.surgery.features import pooled_features, prompt_features
from tests.conftest import randomize_slot


def _alone(model, prompt, slot):
    with surgery.context(model).use(slot):
        h = model(input_ids=torch.tensor([prompt]), output_hidden_states=True).hidden_states[-1]
    return torch.nn.functional.normalize(h[0].mean(0), dim=0)


def test_each_prompt_through_its_slot_equals_it_alone_however_batched():
    model = tiny_llama(vocab=64)
    for seed in (1, 2):
        slot = surgery.inject(model, LoraConfig(rank=2, targets=("q_proj", "v_proj"))).slot
        randomize_slot(model, slot, std=0.3, seed=seed)
    prompts = [[1, 5, 9], [7, 3, 3, 2, 8, 4], [11], [4, 4, 4, 4], [9, 8]]
    slots = [0, 1, -1, 1, 0]
    want = torch.stack([_alone(model, p, s) for p, s in zip(prompts, slots, strict=True)])
    for batch_size, max_tokens in ((16, None), (2, None), (16, 8), (1, 1)):
        got = pooled_features(model, prompts, slots, batch_size, max_tokens)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(prompt_features(model, prompts),
                               pooled_features(model, prompts, [-1] * 5))
    assert (want[0] - _alone(model, prompts[0], -1)).abs().max() > 1e-3
