"""``make demo``: adapters for the bundled tasks on the embedded SmolLM2, base vs adapter.

One base model stays in memory. For each task: score the base model's held-out exact
match, train an adapter (LoRA or prefix; PEFT format, with its loss plot), score it
again, unload it, and go on to the next task. The result is a table and a few answers
before and after, and a store (``<out>/store``) holding every adapter with its chat-app
card, ready for ``loratree serve --store <out>/store``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from loratree import surgery
from loratree.adapters import AdapterStore
from loratree.adapters.card_files import write_card
from loratree.demo.tasks import CARDS, TASKS, write_tasks
from loratree.models import load_base
from loratree.train import TrainConfig, fit, save, setup
from loratree.train.data import read_jsonl
from loratree.train.evaluate import exact_match

__all__ = ["DemoResult", "run_demo"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoResult:
    task: str
    base_exact_match: float
    adapter_exact_match: float
    samples: tuple[tuple[str, str, str, str], ...]
    """(prompt, reference, base answer, adapter answer) for a few held-out rows."""
    adapter: Path


def store_of(out: str | Path) -> Path:
    """Where the demo keeps its store of adapters."""
    return Path(out) / "store"


def serve_command(out: str | Path, loratree: str = ".venv/bin/loratree") -> str:
    """The command that serves the demo's adapters in the chat app."""
    return f"{loratree} serve --store {store_of(out)}"


PREFIX_LR = 3e-2
DEFAULT_LR = {"lora": 1e-3, "prefix": PREFIX_LR}


def run_demo(
    out: str | Path = "demo_out",
    *,
    tasks: tuple[str, ...] = tuple(TASKS),
    steps: int = 40,
    n_train: int = 400,
    n_eval: int = 50,
    rank: int = 8,
    lr: float | None = None,
    method: str = "lora",
    virtual_tokens: int = 20,
    progress: bool = True,
) -> list[DemoResult]:
    """Train one adapter per task and compare held-out exact match with the base model.

    ``method`` is "lora" (rank ``rank``, all linear layers) or "prefix" (``virtual_tokens``
    per layer). ``lr`` defaults to what suits the method: 1e-3 for LoRA, PREFIX_LR for
    prefix-tuning, which moves raw key/value vectors and needs larger steps.
    """
    out = Path(out)
    data = write_tasks(out / "data", n_train, n_eval, names=tasks)
    model, tokenizer = load_base(None)
    results = []
    for task in tasks:
        train_path, eval_path = data[task]
        rows = read_jsonl(eval_path).rows
        base_em, base_pairs = exact_match(model, tokenizer, rows, max_new_tokens=24)
        config = TrainConfig(
            data=str(train_path), eval_data=str(eval_path), out=str(out / "adapters" / task),
            method=method, virtual_tokens=virtual_tokens, rank=rank, alpha=2.0 * rank,
            targets=("all-linear",), lr=lr or DEFAULT_LR[method], max_steps=steps,
            warmup_steps=max(steps // 10, 1), batch_size=8, max_length=96,
            eval_every=steps, save_every=steps, keep_last=1, eval_examples=0,
        )
        run = setup(config, model=model, tokenizer=tokenizer)
        fit(run, progress=progress)
        adapter = save(run)
        write_card(adapter, CARDS[task])
        AdapterStore(store_of(out)).add(task, adapter)
        em, pairs = exact_match(model, tokenizer, rows, max_new_tokens=24)
        samples = tuple(
            (r.messages[-2].content, ref, base, mine)
            for r, (base, ref), (mine, _) in zip(rows[:3], base_pairs[:3], pairs[:3], strict=True)
        )
        results.append(DemoResult(task, base_em, em, samples, adapter))
        surgery.unload(model)
        logger.info("%s: base %.0f%% -> adapter %.0f%%", task, 100 * base_em, 100 * em)
    return results
