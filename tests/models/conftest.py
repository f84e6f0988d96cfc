"""Fixtures for model loading: a saved tiny Llama with a tokenizer, and the embedded model.

The embedded model is converted once per session into a cache under pytest's temp dir, so
the tests never read or write the user's ``~/.cache/loratree``. Reading the GGUF costs
about 15 s and is done once: the GGUF-loaded model is both the reference for the logits
test and what the conversion writes (``embedded.load_gguf`` is patched to hand it over,
so ``embedded_model_dir`` runs its real write path without parsing the file twice).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from loratree.models import embedded as embedded_mod
from loratree.models import load_base, tiny_llama


def tiny_tokenizer(vocab: int = 128) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built offline: ``"w5 w7"`` -> ``[5, 7]``; unknown words -> 0."""
    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture
def tiny_llama_dir(tmp_path: Path) -> Path:
    """``tiny_llama(seed=0)`` and :func:`tiny_tokenizer` saved with ``save_pretrained``."""
    path = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _no_network(*args: object, **kwargs: object) -> None:
    raise RuntimeError("network access while loading a model offline")


@dataclass(frozen=True)
class Embedded:
    """The embedded model loaded both ways, and what the conversion cost."""

    cache: Path
    model_dir: Path
    gguf_model: PreTrainedModel
    gguf_tokenizer: PreTrainedTokenizerBase
    gguf_seconds: float
    write_seconds: float


@pytest.fixture(scope="session")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Embedded:
    """Read the GGUF once (offline, sockets blocked) and convert it into a fresh cache."""
    cache = tmp_path_factory.mktemp("loratree-cache")
    gguf = embedded_mod.embedded_gguf_path()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", _no_network)
        start = time.perf_counter()
        model, tokenizer = load_base(gguf)
        gguf_seconds = time.perf_counter() - start

        def handed_over(path: Path, *, dtype: torch.dtype) -> tuple[object, object]:
            assert (path, dtype) == (gguf, torch.float32)
            return model, tokenizer

        mp.setattr(embedded_mod, "load_gguf", handed_over)
        start = time.perf_counter()
        model_dir = embedded_mod.embedded_model_dir(cache)
        write_seconds = time.perf_counter() - start
    return Embedded(cache, model_dir, model, tokenizer, gguf_seconds, write_seconds)
