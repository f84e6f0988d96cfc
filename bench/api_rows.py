"""The ``api`` group of ``bench.run``: what the OpenAI API's extras cost beside the plain
path, on the loaded SmolLM2 base, each table timed interleaved in one run (medians):

- logprobs in a mixed decode step of 8 rows (none, half, all asking) and echo's prompt
  logprobs against a plain prefill (``bench.logprobs``);
- JSON-constrained rows in a decode step of 8 (0, 4, 8 of them), with one row's mask and
  advance alone (``bench.constrained``);
- embeddings throughput over 1 and 4 adapters against the same inputs as a
  ``max_tokens=1`` generation and a bare forward (``bench.embeddings``).

Alone: ``python -m bench.run --only api [--quick]``; each table also has its own script.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from bench import embeddings
from bench.constrained import constrained_table
from bench.contenders import QV_R8
from bench.logprobs import ADAPTERS, logprobs_table
from bench.report import Check, Table
from bench.serve_rows import make_store

__all__ = ["FULL", "QUICK", "ApiSettings", "api_tables"]

log = logging.getLogger("bench")


@dataclass(frozen=True)
class ApiSettings:
    """How long each of the group's three tables measures."""

    logprob_rounds: int
    """Decode-step rounds; the echo prefill takes a quarter of them (at least 3)."""
    prompt: int
    """Prompt tokens per row of the logprobs batch."""
    constrained_rounds: int
    constrained_steps: int
    """Decode steps timed per contender and round."""
    embed_settings: tuple[embeddings.Setting, ...]
    embed_rounds: int


FULL = ApiSettings(logprob_rounds=20, prompt=32, constrained_rounds=9, constrained_steps=32,
                   embed_settings=(embeddings.Setting(32, 64, 1),
                                   embeddings.Setting(32, 64, 4)), embed_rounds=9)
QUICK = ApiSettings(logprob_rounds=3, prompt=16, constrained_rounds=2, constrained_steps=4,
                    embed_settings=tuple(embeddings.QUICK), embed_rounds=3)


def api_tables(base: nn.Module, tokenizer: object,
               settings: ApiSettings = FULL) -> tuple[list[Table], list[Check]]:
    """The three tables over one store of q,v r=8 adapters ``a0``..``a3``."""
    with tempfile.TemporaryDirectory(prefix="loratree-api-") as tmp:
        n = max(ADAPTERS, *(s.adapters for s in settings.embed_settings))
        store = make_store(base, QV_R8, Path(tmp), n)
        log.info("api: logprobs, %d rounds", settings.logprob_rounds)
        tables = [logprobs_table(base, tokenizer, store, settings.prompt,
                                 settings.logprob_rounds)]
        log.info("api: constrained decoding, %d rounds x %d steps",
                 settings.constrained_rounds, settings.constrained_steps)
        tables.append(constrained_table(base, tokenizer, store, settings.constrained_rounds,
                                        settings.constrained_steps))
        log.info("api: embeddings, %d rounds", settings.embed_rounds)
        tables.append(embeddings.embeddings_table(base, tokenizer, store,
                                                  list(settings.embed_settings),
                                                  settings.embed_rounds))
    return tables, []
