"""The same checks on CUDA: layers, mixed batches, NF4, merging and training run on the GPU
and agree with the CPU (and PEFT) within the issues' tolerances. Skipped without CUDA."""

import copy

import peft
import pytest
import torch
from torch import nn

from loratree import surgery
from loratree.adapters import AdapterStore, save_adapter
from loratree.config import LoraConfig, PrefixConfig
from loratree.layers import LoraLinear, NF4Linear, SlotContext, SlotSpec
from loratree.models.tiny import random_tokens, tiny_llama, tiny_tokenizer
from loratree.ops import nf4
from loratree.serve import Engine, Request
from loratree.serve.slot_table import BASE, SlotTable
from loratree.tree.cache import AdapterCache
from tests.conftest import keep_logits, randomize_slot
from tests.serve.common import VOCAB, solo_reference, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    """fp32 comparisons need fp32 products: no TF32 on Ampere and later."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _close(got, want, tol):
    """max |got - want| <= tol * max(1, max |want|) (logits of the x5 tiny model are large)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    err = (got - want).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), err


def test_lora_model_on_cuda_matches_peft_on_cuda(tmp_path):
    model = tiny_llama()
    surgery.inject(model, LoraConfig(rank=4, alpha=8, targets=("all-linear",)))
    randomize_slot(model, 0, std=0.2)
    save_adapter(model, tmp_path / "a", 0)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").to(CUDA).eval()
    ours = model.to(CUDA).eval()
    ids = random_tokens(128, 3, 11).to(CUDA)
    with torch.no_grad():
        _close(ours(ids).logits, theirs(ids).logits, 1e-5)


@pytest.mark.parametrize("tokens", [2, 40])  # side-by-side matmuls (decode) / per-slot
def test_per_token_slots_on_cuda_equal_each_slot_alone(tokens):
    ctx = SlotContext()
    layer = LoraLinear(nn.Linear(32, 24), ctx)
    for rank in (4, 2, 8):
        layer.add_slot(SlotSpec(rank, 2.0 * rank))
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p))
    layer = layer.to(CUDA)
    x = torch.randn(5, tokens, 32, device=CUDA)
    index = torch.tensor([2, -1, 0, 1, 2], device=CUDA)
    want = []
    for row, slot in enumerate(index.tolist()):
        with ctx.use(slot):
            want.append(layer(x[row : row + 1]))
    with torch.no_grad(), ctx.use(index):
        got = layer(x)
    _close(got, torch.cat(want), 1e-5)
    with ctx.use(index):  # training: gradients reach only the slots used
        layer(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.is_cuda for p in layer.lora_a)


def test_nf4_on_cuda_equals_nf4_on_cpu():
    w = torch.randn(96, 128)
    cpu, gpu = nf4.quantize(w), nf4.quantize(w.to(CUDA))
    for a, b in zip(cpu.tensors(), gpu.tensors(), strict=True):
        assert torch.equal(a, b.cpu())
    assert torch.equal(nf4.dequantize(cpu), nf4.dequantize(gpu).cpu())
    linear = nn.Linear(128, 96)
    layer = NF4Linear.from_linear(linear).to(CUDA)
    x = torch.randn(4, 128, device=CUDA)
    ref = x @ layer.dequantize().t() + layer.bias
    _close(layer(x), ref, 1e-5)


def test_merged_switching_on_cuda_stays_within_bound():
    m = tiny_llama()
    for slot in (0, 1):
        surgery.inject(m, LoraConfig(rank=4, alpha=8, targets=("all-linear",)))
        randomize_slot(m, slot, seed=slot + 1)
    m = m.to(CUDA)
    layers = surgery.lora_layers(m)
    surgery.merge(m, 0)
    truth = {n: layer.weight.detach().clone() for n, layer in layers.items()}
    for i in range(1000):
        surgery.switch(m, 1 if i % 2 == 0 else 0)
    drift = max(((layer.weight - truth[n]).abs().max() / truth[n].abs().max()).item()
                for n, layer in layers.items())
    assert drift <= 1e-5, drift


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = AdapterStore(tmp_path_factory.mktemp("store"))
    for i, cfg in enumerate((LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj")),
                             LoraConfig(rank=4, alpha=8, targets=("all-linear",)))):
        model = tiny_model()
        surgery.inject(model, cfg)
        randomize_slot(model, 0, std=0.3, seed=i)
        store.save(f"lora{i}", model, 0)
    model = tiny_model()
    vectors = torch.randn(3, surgery.geometry(model).width)
    surgery.add_prefix(model, PrefixConfig(n_virtual=3), vectors=vectors)
    store.save("prefix", model, 0)
    return store


def test_engine_on_cuda_mixed_batch_equals_each_alone_on_cpu(store):
    model = tiny_model().to(CUDA)
    table = SlotTable(model, AdapterCache(store, 10**7), n_slots=4, max_rank=8)
    engine = Engine(model, tiny_tokenizer(VOCAB), table)
    kept = keep_logits(engine)
    plan = [("lora0", [5, 9, 13, 3, 40], 6), ("prefix", [7, 7, 8], 4), (BASE, [30, 31], 5),
            ("lora1", [11, 50], 6)]
    handles = [engine.submit(Request(p, adapter=a, max_new_tokens=n)) for a, p, n in plan[:2]]
    engine.step()
    handles += [engine.submit(Request(p, adapter=a, max_new_tokens=n)) for a, p, n in plan[2:]]
    while engine.busy():
        engine.step()
    for (name, prompt, n), handle in zip(plan, handles, strict=True):
        tokens, logits = solo_reference(store, name, prompt, n)
        result = handle.result()
        assert list(result.tokens) == tokens, name
        _close(torch.stack(kept[handle]), torch.stack(logits), 1e-4)


def test_training_on_cuda_follows_the_cpu_run(tmp_path):
    """Twenty fp32 steps on the GPU give the CPU run's losses and weights (1e-4)."""
    from loratree.train import TrainConfig, fit, setup

    rows = [{"prompt": f"w{3 + i % 40} w{5 + i % 7}", "completion": f"w{10 + i % 20}"}
            for i in range(64)]
    config = TrainConfig(data=None, out=str(tmp_path / "gpu"), rank=4, alpha=8.0,
                         targets=("all-linear",), batch_size=4, max_steps=20, lr=1e-2,
                         seed=3, save_every=20, eval_every=20)
    base, tokenizer = tiny_llama(vocab=64), tiny_tokenizer(64)
    gpu = setup(config, model=copy.deepcopy(base), tokenizer=tokenizer, rows=rows)
    assert next(gpu.model.parameters()).is_cuda
    gpu_result = fit(gpu, progress=False)
    cpu = setup(TrainConfig(**{**config.to_dict(), "out": str(tmp_path / "cpu"),
                               "device": "cpu"}),
                model=copy.deepcopy(base), tokenizer=tokenizer, rows=rows)
    cpu_result = fit(cpu, progress=False)
    assert abs(gpu_result.train_loss - cpu_result.train_loss) <= 1e-4 * max(
        1.0, abs(cpu_result.train_loss))
    for name, p in cpu.params.items():
        _close(gpu.params[name], p, 1e-4)
