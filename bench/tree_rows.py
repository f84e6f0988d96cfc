"""An adapter tree on SmolLM2: a child trained on top of its frozen parent, scored on the
child's task against the parent alone, and its flat export checked in PEFT.

The parent learns the ``numbers`` demo task (all-linear r=8); the child, ``numbers/dates``,
learns the ``dates`` task on top of it (all-linear r=4, the parent path frozen and running
under it). Both are scored through the serving path (slot table over the cache, which
composes the node) on the same held-out rows.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import peft
import torch

from bench.report import Check, Row, Table
from loratree import surgery
from loratree.adapters import AdapterStore
from loratree.demo.tasks import write_tasks
from loratree.models import load_base
from loratree.serve.slot_table import BASE, SlotTable
from loratree.train import TrainConfig, train
from loratree.train.data import read_jsonl
from loratree.train.evaluate import exact_match
from loratree.tree import Tree
from loratree.tree.cache import AdapterCache

__all__ = ["tree_tables"]

log = logging.getLogger(__name__)

PARENT, CHILD = "numbers", "dates"
STEPS, BATCH, N_TRAIN, N_EVAL, MAX_NEW = 30, 4, 400, 30, 24


def tree_tables(root: Path) -> tuple[list[Table], list[Check]]:
    data = write_tasks(root / "data", N_TRAIN, N_EVAL, names=(PARENT, CHILD))
    base, tok = load_base(None)
    store = AdapterStore(root / "store")
    common = dict(max_length=128, batch_size=BATCH, lr=1e-3, max_steps=STEPS, warmup_steps=3,
                  eval_every=STEPS, save_every=STEPS, keep_last=1, eval_examples=0,
                  targets=("all-linear",), store=str(store.root))
    node = f"{PARENT}/{CHILD}"
    log.info("tree: training %s, then %s on top of it", PARENT, node)
    train(TrainConfig(data=str(data[PARENT][0]), eval_data=str(data[PARENT][1]), rank=8,
                      alpha=16, out=str(root / "runs" / PARENT), node=PARENT, **common),
          progress=False, model=copy.deepcopy(base), tokenizer=tok)
    parent_file = store.path_of(PARENT) / "adapter_model.safetensors"
    before = parent_file.read_bytes()
    train(TrainConfig(data=str(data[CHILD][0]), eval_data=str(data[CHILD][1]), rank=4,
                      alpha=8, parent=PARENT, node=node, out=str(root / "runs" / "child"),
                      **common), progress=False, model=copy.deepcopy(base), tokenizer=tok)
    identical = parent_file.read_bytes() == before

    model = copy.deepcopy(base)
    table = SlotTable(model, AdapterCache(store, 1 << 30), n_slots=2, max_rank=64)
    held = {task: read_jsonl(data[task][1]).rows[:N_EVAL] for task in (PARENT, CHILD)}

    def em(name: str, task: str) -> float:
        with torch.no_grad(), surgery.context(model).use(table.activate(name)):
            return exact_match(model, tok, held[task], max_new_tokens=MAX_NEW)[0]

    scores = {(n, t): em(n, t) for n in (BASE, PARENT, node) for t in (CHILD, PARENT)}
    diff, effect = _export_gap(base, store, node, table, model, root)
    rows = [
        Row(f"{CHILD} held-out exact match: node vs its parent alone",
            scores[node, CHILD], scores[PARENT, CHILD], "share"),
        Row(f"{CHILD} held-out exact match: node vs the base", scores[node, CHILD],
            scores[BASE, CHILD], "share"),
        Row(f"{PARENT} held-out exact match (the parent's task): node vs parent",
            scores[node, PARENT], scores[PARENT, PARENT], "share"),
    ]
    notes = [
        f"SmolLM2. Parent `{PARENT}`: all-linear r=8 on the {PARENT} demo task; child "
        f"`{node}`: all-linear r=4 on the {CHILD} task, trained with `--parent {PARENT}` (the "
        f"parent path frozen and running under it), {STEPS} steps of batch {BATCH} each, lr "
        f"1e-3. Scored through the serving slot table (the node composed by rank "
        f"concatenation: rank 12) on {N_EVAL} held-out rows per task, greedy. The parent's "
        f"file is byte-identical after the child's training: {'yes' if identical else 'NO'}. "
        f"The node exported flat (`loratree tree export`) and loaded by "
        f"`peft.PeftModel.from_pretrained`: max |logit difference| vs loratree serving the "
        f"node {diff:.2e} (the node moves the base's logits by up to {effect:.2f}).",
    ]
    checks = [
        Check(f"tree: child node beats its parent alone on the child's task ({CHILD} EM)",
              f"{100 * scores[node, CHILD]:.1f}% vs {100 * scores[PARENT, CHILD]:.1f}%",
              scores[node, CHILD] > scores[PARENT, CHILD]),
        Check("tree: the parent's weights are bit-identical after training the child",
              "byte-identical" if identical else "changed", identical),
        Check("tree: the flat export in PEFT gives loratree's logits (SmolLM2, 1e-4)",
              f"{diff:.1e}", diff <= 1e-4),
    ]
    return [Table("An adapter tree: a child trained on its frozen parent", rows, notes,
                  peer_name="alternative")], checks


def _export_gap(base, store: AdapterStore, node: str, table: SlotTable, model, root: Path
                ) -> tuple[float, float]:
    """Max |logit| difference of PEFT on the flat export vs loratree serving the node, and
    (for scale) of loratree serving the node vs the bare base."""
    flat = Tree(store).export(node, root / "flat")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), flat).eval()
    ids = torch.randint(0, base.config.vocab_size, (2, 48), generator=torch.Generator()
                        .manual_seed(3))
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        with surgery.context(model).use(table.activate(node)):
            got = model(input_ids=ids).logits
        with surgery.context(model).use(-1):
            bare = model(input_ids=ids).logits
    return float((got - want).abs().max()), float((got - bare).abs().max())
