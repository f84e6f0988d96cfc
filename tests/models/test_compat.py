"""models.compat: the key/value cache goes by the name the installed transformers expects
(``cache`` from 5.24, ``past_key_values`` before), so prefill and decode through every
loratree path raise no deprecation of the old name."""

from __future__ import annotations

import contextlib
import inspect
import warnings

import peft
import pytest
import torch
import transformers
from torch import nn
from transformers import DynamicCache

from loratree import surgery
from loratree.adapters import AdapterStore
from loratree.config import LoraConfig, PrefixConfig
from loratree.models import compat
from loratree.models.tiny import tiny_gpt2, tiny_llama, tiny_tokenizer
from loratree.serve import Engine, Request
from loratree.serve.slot_table import SlotTable
from loratree.train.greedy import greedy_tokens
from loratree.tree.cache import AdapterCache
from tests.conftest import randomize_slot

VOCAB = 64


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_the_keyword_is_the_one_the_forward_lists(make):
    model = make(vocab=VOCAB)
    name = compat.cache_kwarg(model)
    params = inspect.signature(type(model).forward).parameters
    assert name in compat.CACHE_KWARGS and name in params
    assert name == compat.INSTALLED  # transformers' own families follow the release
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules="all-linear"))
    assert compat.cache_kwarg(wrapped) == name  # PEFT's forward passes **kwargs on
    assert compat.forward_takes(wrapped, "position_ids")


def test_a_forward_listing_neither_name_gets_the_installed_ones():
    class Passes(nn.Module):
        def forward(self, input_ids, **kwargs):
            return input_ids

    assert compat.cache_kwarg(Passes()) == compat.INSTALLED
    assert compat.cache_kwargs(Passes(), 7) == {compat.INSTALLED: 7}


def test_the_output_cache_and_popping_either_name():
    model = tiny_llama(vocab=VOCAB)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    cache = compat.output_cache(out)
    assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 3
    a, b = object(), object()
    kwargs = {"past_key_values": a, "cache": b, "x": 1}
    assert compat.pop_cache(kwargs) is b and kwargs == {"x": 1}
    assert compat.pop_cache({"past_key_values": a}) is a
    assert compat.pop_cache({}) is None


@contextlib.contextmanager
def _no_cache_deprecation(monkeypatch):
    """Fail on the deprecation of ``past_key_values``: the forwards' FutureWarning (made an
    error) and the outputs' ``past_key_values`` property's log line (recorded: it is logged
    once per process, so it is caught where logged, not in the log)."""
    logged: list[str] = []
    generic = transformers.utils.generic
    if hasattr(generic, "logger"):
        monkeypatch.setattr(generic.logger, "warning_once",
                            lambda msg, *a, **k: logged.append(str(msg)), raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.filterwarnings("error", message=r".*past_key_values.*")
        yield
    assert not [m for m in logged if "past_key_values" in m], logged


def test_prefill_and_decode_use_the_current_name(tmp_path, monkeypatch):
    """The engine's prefill, decode and packed join; a prefix adapter's hook (and its
    vocabulary start); greedy decoding: none passes or reads the deprecated name."""
    store = AdapterStore(tmp_path)
    lora = tiny_llama(vocab=VOCAB)
    surgery.inject(lora, LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj")))
    randomize_slot(lora, 0, std=0.3)
    store.save("qv", lora, 0)
    with _no_cache_deprecation(monkeypatch):
        prefixed = tiny_llama(vocab=VOCAB)
        surgery.add_prefix(prefixed, PrefixConfig(n_virtual=2))  # init "vocab": a forward
        store.save("prefix", prefixed, 0)
        model = tiny_llama(vocab=VOCAB)
        model.generation_config.eos_token_id = None
        table = SlotTable(model, AdapterCache(store, 10**7), n_slots=4, max_rank=8)
        engine = Engine(model, tiny_tokenizer(VOCAB), table)
        first = [engine.submit(Request([5, 9, 13], adapter=a, max_new_tokens=4))
                 for a in ("qv", "prefix")]
        engine.step()  # prefill, then decode steps
        late = engine.submit(Request([7, 8], adapter="qv", max_new_tokens=3))
        while engine.busy():
            engine.step()
        assert [len(h.result().tokens) for h in [*first, late]] == [4, 4, 3]
        got = greedy_tokens(tiny_llama(vocab=VOCAB), [[1, 2, 3], [4]], max_new_tokens=3,
                            pad_id=0, stop=set(), device=torch.device("cpu"))
        assert [len(t) for t in got] == [3, 3]
