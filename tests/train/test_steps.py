"""The trainers' loss: only labelled positions reach the LM head, and the per-token losses
and their gradients equal the naive cross-entropy over the model's full logits."""

import pytest
import torch
import torch.nn.functional as F

from loratree import surgery
from loratree.config import LoraConfig
from loratree.models.chat import IGNORE_INDEX
from loratree.models.tiny import tiny_gpt2, tiny_llama
from loratree.train.steps import token_losses


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    """Three right-padded rows of 9, 12 and 7 tokens, each labelled on a different span
    (the last row's label run reaches its final token)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, 12), generator=g)
    mask = torch.zeros(3, 12, dtype=torch.long)
    labels = torch.full((3, 12), IGNORE_INDEX)
    for row, (n, lo, hi) in enumerate([(9, 5, 9), (12, 8, 11), (7, 3, 7)]):
        mask[row, :n] = 1
        labels[row, lo:hi] = ids[row, lo:hi]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _naive(model, batch):
    """Cross-entropy of every next-token prediction over the full logits (0 if ignored)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    token = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(),
                            ignore_index=IGNORE_INDEX, reduction="none")
    return token.view(labels.shape)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_token_losses_equal_the_full_logits_cross_entropy(make):
    model = make(vocab=64)
    surgery.inject(model, LoraConfig(rank=2, alpha=4, targets=("all-linear",)))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    batch = _batch(64)
    got = token_losses(model, batch, "fp32")
    grads = torch.autograd.grad(got.sum(), params)
    want = _naive(model, batch)
    want_grads = torch.autograd.grad(want.sum(), params)
    first = want.shape[1] - got.shape[1]  # columns before the first labelled one: all 0
    assert first >= 0 and not want[:, :first].any()
    torch.testing.assert_close(got, want[:, first:], atol=1e-6, rtol=1e-5)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_token_losses_of_a_batch_with_no_labels_are_zero():
    model = tiny_llama(vocab=64)
    batch = _batch(64)
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    assert not token_losses(model, batch, "fp32").any()
