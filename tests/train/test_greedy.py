"""train.greedy: a batch whose stopped rows leave gives transformers' greedy tokens."""

from __future__ import annotations

import collections

import pytest
import torch

from loratree import surgery
from loratree.config import LoraConfig, PrefixConfig
from loratree.models.tiny import tiny_gpt2, tiny_llama
from loratree.train.greedy import greedy_tokens, stop_tokens, supports_greedy
from tests.conftest import randomize_slot

PAD = 0


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (5, 9, 3, 7, 9, 4)]


def _hf(model, prompts, slots, new, stop):
    """Reference: each prompt alone through ``generate`` (no padding at all), cut before
    its first stop token."""
    out = []
    for p, s in zip(prompts, slots, strict=True):
        with surgery.context(model).use(s):
            ids = model.generate(input_ids=torch.tensor([p]), do_sample=False,
                                 max_new_tokens=new, pad_token_id=PAD,
                                 eos_token_id=sorted(stop) or None)[0, len(p):].tolist()
        cut = next((i for i, t in enumerate(ids) if t in stop), len(ids))
        out.append(ids[:cut])
    return out


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_rows_leaving_the_batch_give_generates_tokens(make):
    """A batch of rows of different prompt lengths and adapters (two LoRA slots and the
    base), with a stop token chosen so rows stop at different steps: each row's tokens
    equal ``generate`` on that prompt alone."""
    vocab = 64
    model = make(vocab=vocab)
    targets = ("q_proj", "v_proj") if make is tiny_llama else ("c_attn",)
    for seed in (1, 2):
        report = surgery.inject(model, LoraConfig(rank=2, alpha=4, targets=targets))
        randomize_slot(model, report.slot, std=0.3, seed=seed)
    model.eval()
    prompts = _prompts(vocab)
    slots = [0, 1, -1, 1, 0, -1]
    new = 10
    free = _hf(model, prompts, slots, new, set())
    assert all(len(t) == new for t in free)
    # the commonest token after the first step: rows reach it at different steps
    counts = collections.Counter(t for row in free for t in row[1:])
    stop = {counts.most_common(1)[0][0]}
    expected = _hf(model, prompts, slots, new, stop)
    lengths = {len(t) for t in expected}
    assert len(lengths) > 1 and max(lengths) > min(lengths)  # rows really left early
    got = greedy_tokens(model, prompts, max_new_tokens=new, pad_id=PAD, stop=stop,
                        device=torch.device("cpu"), slots=slots)
    assert got == expected


def test_edges_and_fallbacks():
    model = tiny_llama(vocab=64)
    cpu = torch.device("cpu")
    assert greedy_tokens(model, [], max_new_tokens=4, pad_id=PAD, stop=set(), device=cpu) == []
    assert greedy_tokens(model, [[1, 2]], max_new_tokens=0, pad_id=PAD, stop=set(),
                         device=cpu) == [[]]
    one = greedy_tokens(model, [[1, 2, 3]], max_new_tokens=3, pad_id=PAD, stop=set(), device=cpu)
    assert len(one[0]) == 3
    assert supports_greedy(model)
    model.generation_config.eos_token_id = [5, 7]
    assert stop_tokens(model, None) == {5, 7}
    surgery.add_prefix(model, PrefixConfig(n_virtual=2))
    assert not supports_greedy(model)  # a prefix model decodes with generate
