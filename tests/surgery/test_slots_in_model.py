"""Per-row slots through a whole model, forward and backward."""

import torch

from loratree import surgery
from loratree.config import LoraConfig
from loratree.models.tiny import tiny_llama
from tests.conftest import randomize_slot

ROW_SLOTS = [0, 1, -1, 0, 1]


def _two_adapters():
    m = tiny_llama()
    for slot, targets in enumerate((("all-linear",), ("q_proj", "v_proj", "embed_tokens"))):
        surgery.inject(m, LoraConfig(rank=4 + 2 * slot, alpha=8, targets=targets))
        randomize_slot(m, slot, seed=slot + 7)
    surgery.set_trainable(m, 0, 1)
    return m


def test_mixed_batch_equals_each_row_alone_forward_and_backward():
    m = _two_adapters()
    ctx = surgery.context(m)
    ids = torch.randint(0, 128, (len(ROW_SLOTS), 10))
    with ctx.use(torch.tensor(ROW_SLOTS)):
        mixed = m(ids).logits
    mixed.pow(2).mean(dim=(1, 2)).sum().backward()
    grads_mixed = [p.grad.clone() for p in surgery.adapter_parameters(m)]
    m.zero_grad(set_to_none=False)
    for row, slot in enumerate(ROW_SLOTS):
        with ctx.use(slot):
            alone = m(ids[row : row + 1]).logits
        torch.testing.assert_close(mixed[row : row + 1], alone, atol=1e-5, rtol=0)
        if slot >= 0:  # a base-only row reaches no adapter parameter
            alone.pow(2).mean().backward()  # accumulates: the sum over rows, as in the batch
    grads_alone = [p.grad for p in surgery.adapter_parameters(m)]
    for g_mixed, g_alone in zip(grads_mixed, grads_alone, strict=True):
        torch.testing.assert_close(g_mixed, g_alone, atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in grads_mixed)


def test_per_token_slots_in_a_model():
    m = _two_adapters()
    ctx = surgery.context(m)
    ids = torch.randint(0, 128, (2, 6))
    index = torch.tensor([[0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    with ctx.use(index):
        per_token = m(ids).logits
    with ctx.use(torch.tensor([0, 1])):
        per_row = m(ids).logits
    torch.testing.assert_close(per_token, per_row, atol=1e-6, rtol=0)
