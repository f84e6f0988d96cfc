"""Prefix adapters on real transformers models: PEFT parity, files both ways, per-row
prefixes in one batch, generation, and training through the MLP reparametrization."""

import copy

import peft
import pytest
import torch

from loratree import surgery
from loratree.adapters import load_adapter, save_adapter
from loratree.config import LoraConfig, PrefixConfig
from loratree.errors import AdapterConfigError, ShapeMismatchError
from loratree.models.tiny import tiny_gpt2, tiny_llama
from tests.conftest import randomize_slot

MODELS = {"llama-gqa": tiny_llama, "gpt2": tiny_gpt2}


def _peft_prefix(base, n_virtual, seed=0):
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=n_virtual))
    return model.eval()


def _vectors(model):
    return model.prompt_encoder["default"].embedding.weight.detach().clone()


def _batch(seed=0, b=3, t=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (b, t), generator=g)
    mask = torch.ones_like(ids)
    if b > 1:
        mask[1, 5:] = 0  # right padding, as training batches have
    return ids, mask


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_same_vectors_give_peft_logits_and_tokens(make):
    base = make()
    theirs = _peft_prefix(base, 4)
    ours = copy.deepcopy(base)
    surgery.add_prefix(ours, PrefixConfig(n_virtual=4), vectors=_vectors(theirs),
                       trainable=False)
    ids, mask = _batch()
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
        plain = base(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)
    assert (got[real] - plain[real]).abs().max() > 1e-2  # the prefix does something
    # PEFT's own generate() with a prefix breaks on transformers >= 5.24 (it passes the
    # prefix as `past_key_values` while generate passes `cache`), so the reference is
    # greedy decoding through PEFT's forward, without a cache.
    got = ours.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=6,
                        do_sample=False)
    assert got.tolist() == _greedy_without_cache(theirs, ids[:1], 6).tolist()


def _greedy_without_cache(model, ids, n):
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_files_move_between_peft_and_loratree(make, tmp_path):
    base = make()
    ids, mask = _batch(1)
    theirs = _peft_prefix(base, 5, seed=3)
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    slot = load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=0)

    save_adapter(ours, tmp_path / "ours", slot)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        again = back(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(again[mask.bool()], got[mask.bool()], atol=1e-5, rtol=0)


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_rows_with_different_prefixes_equal_each_row_alone(make):
    model = make()
    geo = surgery.geometry(model)
    g = torch.Generator().manual_seed(7)
    p1 = surgery.add_prefix(model, PrefixConfig(n_virtual=3),
                            vectors=torch.randn(3, geo.width, generator=g), trainable=False)
    p2 = surgery.add_prefix(model, PrefixConfig(n_virtual=6),
                            vectors=torch.randn(6, geo.width, generator=g), trainable=False)
    ids, mask = _batch(2)
    slots = torch.tensor([p1, p2, -1])
    ctx = surgery.context(model)
    with torch.no_grad(), ctx.use(slots):
        together = model(input_ids=ids, attention_mask=mask).logits
    for row, slot in enumerate(slots.tolist()):
        with torch.no_grad(), ctx.use(slot):
            alone = model(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1]).logits
        real = mask[row].bool()
        torch.testing.assert_close(together[row][real], alone[0][real], atol=1e-5, rtol=0)

    left = torch.tensor([[0, 0, 5, 6, 7], [9, 10, 11, 12, 13], [0, 20, 21, 22, 23]])
    left_mask = (left != 0).long()
    model.generation_config.eos_token_id = None  # always 8 new tokens, no early stop
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with ctx.use(slots):
        batched = model.generate(input_ids=left, attention_mask=left_mask, **kw)
    for row, slot in enumerate(slots.tolist()):
        n = int(left_mask[row].sum())
        with ctx.use(slot):
            alone = model.generate(input_ids=left[row:row + 1, -n:],
                                   attention_mask=left_mask[row:row + 1, -n:], **kw)
        assert batched[row, left.shape[1]:].tolist() == alone[0, n:].tolist()


def test_prefix_and_lora_adapters_share_one_slot_numbering():
    model = tiny_llama()
    geo = surgery.geometry(model)
    lora = surgery.inject(model, LoraConfig(rank=4, targets=("q_proj", "v_proj")),
                          trainable=False).slot
    randomize_slot(model, lora)
    pre = surgery.add_prefix(model, PrefixConfig(n_virtual=2),
                             vectors=torch.randn(2, geo.width), trainable=False)
    assert (lora, pre) == (0, 1) and surgery.slot_count(model) == 2
    assert all(m.n_slots == 2 and m.specs[1].rank == 0
               for m in surgery.lora_layers(model).values())
    ids, mask = _batch(3)
    ctx = surgery.context(model)
    with torch.no_grad():
        outs = {}
        for s in (lora, pre, -1):
            with ctx.use(s):
                outs[s] = model(input_ids=ids, attention_mask=mask).logits
        with ctx.use(torch.tensor([lora, pre, -1])):
            mixed = model(input_ids=ids, attention_mask=mask).logits
    for row, s in enumerate((lora, pre, -1)):
        real = mask[row].bool()
        torch.testing.assert_close(mixed[row][real], outs[s][row][real], atol=1e-5, rtol=0)
    surgery.unload(model)
    assert surgery.prefix_bank(model) is None and not surgery.lora_layers(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, outs[-1])


def _expressive_llama():
    """A tiny Llama with weights 10x the usual init: at std 0.02 its outputs barely depend
    on what attention sees, so there would be nothing for a prefix to learn."""
    model = tiny_llama()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10.0)
    return model


def test_reparametrized_prefix_trains_and_folds(tmp_path):
    model = _expressive_llama()
    slot = surgery.add_prefix(model, PrefixConfig(n_virtual=4, projection=True,
                                                  encoder_hidden=24))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.requires_grad for p in surgery.adapter_parameters(model, slot))
    assert sum(p.numel() for p in trainable) == sum(
        p.numel() for p in surgery.prefix_bank(model).encoder(slot).parameters())
    ids = torch.arange(10, 18).repeat(4, 1)  # one sequence to learn
    opt = torch.optim.AdamW(trainable, lr=3e-2)
    model.train()
    losses = []
    for _ in range(20):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    model.eval()
    with torch.no_grad():
        unfolded = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "p", slot)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "p" / "adapter_model.safetensors")
    assert list(saved) == ["prompt_embeddings"]
    assert saved["prompt_embeddings"].shape == (4, surgery.geometry(model).width)
    fresh = _expressive_llama()
    load_adapter(fresh, tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, unfolded, atol=1e-5, rtol=0)


def test_keep_positions_start_the_prompt_at_zero(tmp_path):
    model = tiny_gpt2()
    geo = surgery.geometry(model)
    vectors = torch.randn(3, geo.width)
    slot = surgery.add_prefix(model, PrefixConfig(n_virtual=3, positions="keep"),
                              vectors=vectors, trainable=False)
    ids, _ = _batch(5, b=1)
    with torch.no_grad():
        got = model(input_ids=ids).logits
        shifted = model(input_ids=ids, position_ids=torch.arange(7)[None] + 3).logits
    # "keep" adds nothing to explicit positions: giving P.. by hand is PEFT's "shift"
    other = tiny_gpt2()
    surgery.add_prefix(other, PrefixConfig(n_virtual=3), vectors=vectors, trainable=False)
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids=ids).logits, shifted, atol=1e-5, rtol=0)
    assert (got - shifted).abs().max() > 1e-3
    save_adapter(model, tmp_path / "keep", slot)
    again = tiny_gpt2()
    load_adapter(again, tmp_path / "keep")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, got, atol=1e-6, rtol=0)


def test_bad_prefix_files_get_clear_errors(tmp_path):
    import json

    base = tiny_llama()
    theirs = _peft_prefix(base, 3)
    theirs.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    model = tiny_llama(layers=3)
    with pytest.raises(ShapeMismatchError, match="layers, kv heads"):
        load_adapter(model, tmp_path / "a")
    assert surgery.prefix_bank(model) is None  # untouched
    cfg["num_virtual_tokens"] = 5
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ShapeMismatchError, match="prompt_embeddings"):
        load_adapter(tiny_llama(), tmp_path / "a")
    cfg["num_layers"] = "two"
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterConfigError, match="num_layers"):
        load_adapter(tiny_llama(), tmp_path / "a")
