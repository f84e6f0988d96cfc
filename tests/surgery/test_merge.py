import pytest
import torch

from loratree import surgery
from loratree.config import LoraConfig
from loratree.errors import NonFiniteError
from loratree.models.tiny import tiny_convnet, tiny_gpt2, tiny_llama
from tests.conftest import randomize_slot

MODELS = {
    "llama": (tiny_llama, ("all-linear", "embed_tokens")),
    "gpt2": (tiny_gpt2, ("all-linear",)),
    "convnet": (tiny_convnet, ("embed", "conv1d", "conv2d", "proj")),
}


def _adapted(kind, n_adapters=1):
    build, targets = MODELS[kind]
    m = build()
    original = {n: p.detach().clone() for n, p in m.named_parameters()}
    for slot in range(n_adapters):
        surgery.inject(m, LoraConfig(rank=4, alpha=8, targets=targets))
        randomize_slot(m, slot, seed=slot + 1)
    return m, original


def _logits(m, ids):
    out = m(ids)
    return out.logits if hasattr(out, "logits") else out


def _base_weights(m):
    return {n: layer.weight.detach().clone() for n, layer in surgery.lora_layers(m).items()}


@pytest.mark.parametrize("kind", list(MODELS))
def test_merged_equals_unmerged_and_unmerge_restores(kind):
    m, _ = _adapted(kind)
    ids = torch.randint(0, 128, (2, 8))
    before_w = _base_weights(m)
    unmerged = _logits(m, ids)
    surgery.merge(m, 0)
    torch.testing.assert_close(_logits(m, ids), unmerged, atol=1e-4, rtol=0)
    merged_w = _base_weights(m)
    surgery.merge(m, 0)  # merging twice is a no-op
    assert all(torch.equal(merged_w[n], w) for n, w in _base_weights(m).items())
    surgery.unmerge(m)
    for n, w in _base_weights(m).items():
        assert (w - before_w[n]).abs().max() <= 1e-6 * before_w[n].abs().max(), n


@pytest.mark.parametrize("kind", list(MODELS))
def test_unload_restores_original_module_types_and_weights_exactly(kind):
    build, _ = MODELS[kind]
    types = {n: type(mod) for n, mod in build().named_modules()}
    m, original = _adapted(kind)
    surgery.unload(m)
    assert {n: type(mod) for n, mod in m.named_modules()} == types
    assert all(torch.equal(p, original[n]) for n, p in m.named_parameters())


def test_merge_and_unload_gives_a_plain_model_with_the_same_logits():
    m, _ = _adapted("llama")
    ids = torch.randint(0, 128, (2, 8))
    expected = _logits(m, ids)
    plain = surgery.merge_and_unload(m, 0)
    assert not surgery.lora_layers(plain)
    torch.testing.assert_close(_logits(plain, ids), expected, atol=1e-4, rtol=0)


def test_while_merged_other_slots_and_the_base_stay_available():
    m, _ = _adapted("llama", n_adapters=2)
    ids = torch.randint(0, 128, (3, 6))
    ctx = surgery.context(m)
    want = {}
    for slot in (-1, 0, 1):
        with ctx.use(slot):
            want[slot] = _logits(m, ids)
    surgery.merge(m, 0)
    for slot in (-1, 0, 1):
        with ctx.use(slot):
            torch.testing.assert_close(_logits(m, ids), want[slot], atol=1e-4, rtol=0)
    with ctx.use(torch.tensor([1, -1, 0])):
        mixed = _logits(m, ids)
    for row, slot in enumerate((1, -1, 0)):
        torch.testing.assert_close(mixed[row], want[slot][row], atol=1e-4, rtol=0)


def test_switching_1000_times_stays_within_bound():
    m, _ = _adapted("llama", n_adapters=2)
    truth = {}
    for slot in (0, 1):
        surgery.merge(m, slot)
        truth[slot] = _base_weights(m)
        surgery.unmerge(m)
    surgery.merge(m, 0)
    for i in range(1000):  # 0 -> 1 -> 0 -> ...: an even count ends on slot 0
        surgery.switch(m, 1 if i % 2 == 0 else 0)
    assert next(iter(surgery.lora_layers(m).values())).merged == 0
    drift = max(
        ((w - truth[0][n]).abs().max() / truth[0][n].abs().max()).item()
        for n, w in _base_weights(m).items()
    )
    print(f"relative drift after 1000 switches: {drift:.2e} of max|W|")
    assert drift <= 1e-5


def test_merging_non_finite_weights_is_refused_and_names_the_layer():
    m, _ = _adapted("llama")
    before = _base_weights(m)
    layer_name, layer = list(surgery.lora_layers(m).items())[3]
    with torch.no_grad():
        layer.lora_b[0][0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=layer_name.replace(".", r"\.")):
        surgery.merge(m, 0)
    assert all(torch.equal(w, before[n]) for n, w in _base_weights(m).items())
    assert all(lyr.merged is None for lyr in surgery.lora_layers(m).values())
