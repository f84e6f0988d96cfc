"""An engine with CPU tuning serves what an untuned one serves, and once closed leaves the
user's model exactly as it found it."""

import pytest
import torch
from torch import nn

from loratree import surgery
from loratree.adapters import AdapterStore
from loratree.config import LoraConfig
from loratree.models.tiny import tiny_tokenizer
from loratree.serve import Engine, Request
from loratree.serve.cpu import CpuTuning, Piece
from loratree.serve.cpu.linears import oriented_linears
from loratree.serve.slot_table import BASE, SlotTable
from loratree.tree.cache import AdapterCache
from tests.conftest import keep_logits, randomize_slot
from tests.serve.common import VOCAB, tiny_model

PROMPTS = [[5, 9, 13, 3, 40], [7, 7, 8], [30, 31, 32, 33, 34], [11, 50]]
NAMES = ["qv", "all", BASE, "qv"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = AdapterStore(tmp_path_factory.mktemp("store"))
    for seed, (name, targets) in enumerate((("qv", ("q_proj", "v_proj")),
                                            ("all", ("all-linear",)))):
        model = tiny_model()
        surgery.inject(model, LoraConfig(rank=2, alpha=4, targets=targets))
        randomize_slot(model, 0, std=0.3, seed=seed)
        store.save(name, model, 0)
    return store


def _fingerprint(model: nn.Module) -> tuple:
    """Each module's name and type, and the state dict's keys."""
    return ([(name, type(m)) for name, m in model.named_modules()], list(model.state_dict()))


def _attributes(model: nn.Module) -> list:
    """Each module's own attributes (serving itself leaves caches on the LoRA layers)."""
    return [(name, sorted(vars(m))) for name, m in model.named_modules()]


def _serve(store, tuning: CpuTuning | None, threaded: bool):
    """Serve the mixed batch on a fresh model; (model after, model before, handles, their
    logits)."""
    model = tiny_model()
    table = SlotTable(model, AdapterCache(store, 10**7), n_slots=4, max_rank=8)
    before = _fingerprint(model)
    engine = Engine(model, tiny_tokenizer(VOCAB), table, cpu_tuning=tuning)
    kept = keep_logits(engine)
    if tuning is not None and tuning.gemm_orientation:
        assert oriented_linears(model)  # installed while the engine lives
    if threaded:
        engine.start()
    handles = [engine.submit(Request(p, adapter=a, max_new_tokens=6))
               for p, a in zip(PROMPTS, NAMES, strict=True)]
    while not threaded and engine.busy():
        engine.step()
    for h in handles:
        h.result(timeout=60)
    engine.close()
    return model, before, handles, kept


@pytest.mark.parametrize("threaded", [False, True], ids=["stepped", "started"])
def test_an_engine_lifecycle_leaves_the_model_as_it_found_it(store, threaded):
    tuned, before, *_ = _serve(store, CpuTuning(), threaded)
    assert _fingerprint(tuned) == before
    assert oriented_linears(tuned) == []
    assert all("forward" not in vars(m) for m in tuned.modules())
    untuned, *_ = _serve(store, None, threaded)
    assert _attributes(tuned) == _attributes(untuned)  # nothing but what serving leaves


@pytest.mark.parametrize("tuning", [CpuTuning(), CpuTuning.of([Piece.ORIENTATION]),
                                    CpuTuning.of([Piece.OMP_RELEASE])],
                         ids=lambda t: t.label)
def test_tuned_serving_gives_the_untuned_tokens_and_logits(store, tuning):
    _, _, plain, plain_logits = _serve(store, None, threaded=True)
    _, _, tuned, tuned_logits = _serve(store, tuning, threaded=True)
    for a, b in zip(plain, tuned, strict=True):
        assert a.result().tokens == b.result().tokens
        assert a.result().finish_reason == b.result().finish_reason == "length"
        got, want = torch.stack(tuned_logits[b]), torch.stack(plain_logits[a])
        if tuning.gemm_orientation:  # the kernel a shape gets depends on the host, and
            # another GEMM orientation may sum in another order: equal up to rounding
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        else:  # thread settings alone: the same kernels, bit for bit
            assert torch.equal(got, want)


def test_after_close_the_model_computes_bit_for_bit_what_it_did_before(store):
    model = tiny_model()
    table = SlotTable(model, AdapterCache(store, 10**7), n_slots=4, max_rank=8)
    ids = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        want = model(input_ids=ids).logits
    engine = Engine(model, tiny_tokenizer(VOCAB), table, cpu_tuning=CpuTuning()).start()
    engine.generate(Request(PROMPTS[1], adapter=BASE, max_new_tokens=3))
    engine.close()
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, want)
