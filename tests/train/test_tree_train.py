"""Training a tree node: the parent path is frozen and runs under the child; only the child
learns, the parent is untouched, and the child beats its parent on the child's task."""

import json
import random

import pytest
import torch

from loratree.adapters import AdapterStore
from loratree.adapters.node_files import read_record
from loratree.adapters.safetensors_io import read_safetensors
from loratree.cli.main import main
from loratree.models.chat import encode
from loratree.models.tiny import tiny_llama, tiny_tokenizer
from loratree.serve.slot_table import SlotTable
from loratree.train import TrainConfig, train
from loratree.train.data import pad_token_id, read_jsonl
from loratree.train.evaluate import eval_loss
from loratree.train.loop import setup
from loratree.tree import nodes
from loratree.tree.cache import AdapterCache
from tests.conftest import save_tiny_base
from tests.train.driver import write_data

VOCAB = 64


def _task(folder, answer, n=48, seed=3):
    """A task a tiny random model learns in a few dozen steps: any prompt -> ``answer``
    (each node specialises the same base in its own way)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, count in (("train", n), ("eval", 12)):
        rows = []
        for _ in range(count):
            words = [f"w{rng.randint(3, 60)}" for _ in range(rng.randint(2, 6))]
            rows.append({"prompt": " ".join(words), "completion": answer})
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(folder / f"{name}.jsonl")
    return paths


def _model():
    return tiny_llama(vocab=VOCAB), tiny_tokenizer(VOCAB)


def _served_eval_loss(store, name, eval_path):
    """Eval loss of ``name`` as the serving path loads it (composed through the cache)."""
    model, tok = _model()
    table = SlotTable(model, AdapterCache(store, 10**8), n_slots=1, max_rank=64)
    slot = table.activate(name)
    data = encode(read_jsonl(eval_path), tok, 64)
    from loratree import surgery

    with surgery.context(model).use(slot):
        return eval_loss(model, data.examples, batch_size=4, pad_id=pad_token_id(tok),
                         device=torch.device("cpu"))


def test_a_child_learns_on_its_frozen_parent_and_beats_it(tmp_path, capsys):
    store = AdapterStore(tmp_path / "store")
    rev_train, rev_eval = _task(tmp_path / "reverse", "w20 w21 w22", seed=0)
    common = dict(max_steps=40, max_length=64, batch_size=8, lr=1e-2, warmup_steps=2,
                  eval_every=40, save_every=40, eval_examples=0, store=str(store.root))
    model, tok = _model()
    train(TrainConfig(data=str(rev_train), eval_data=str(rev_eval), rank=4, alpha=8,
                      targets=("q_proj", "v_proj"), out=str(tmp_path / "support"),
                      node="support", **common), progress=False, model=model, tokenizer=tok)
    parent_file = store.path_of("support") / "adapter_model.safetensors"
    parent_bytes = parent_file.read_bytes()

    copy_train, copy_eval = _task(tmp_path / "copy", "w7 w9 w11 w13")
    child = TrainConfig(data=str(copy_train), eval_data=str(copy_eval), rank=2, alpha=4,
                        targets=("all-linear",), out=str(tmp_path / "child"),
                        parent="support", node="support/copy", **common)
    model, tok = _model()
    run = setup(child, model=model, tokenizer=tok)
    assert all(n.endswith(".0") for n in run.params)  # slot 0: the child only
    trainable = sum(p.numel() for p in run.params.values())
    assert trainable == sum(p.numel() for n, p in model.named_parameters()
                            if "lora_" in n and n.endswith(".0"))
    model, tok = _model()
    result = train(child, progress=False, model=model, tokenizer=tok)
    assert result.steps == 40

    assert parent_file.read_bytes() == parent_bytes  # the parent is bit-identical
    assert store.path_of("support") / "adapter_model.safetensors" == parent_file
    record = read_record(store.path_of("support/copy"))
    assert record.parent == "support" and not nodes.stale(store, "support/copy")
    assert set(record.metrics) == {"eval_loss"}
    own = read_safetensors(store.path_of("support/copy") / "adapter_model.safetensors")
    assert all(t.shape[0] == 2 or t.shape[1] == 2 for t in own.values())  # its own rank only

    parent_alone = _served_eval_loss(store, "support", copy_eval)
    node = _served_eval_loss(store, "support/copy", copy_eval)
    with capsys.disabled():
        print(f"\ntree child: eval loss on the child's task {node:.3f} (node support/copy) "
              f"vs {parent_alone:.3f} (its parent alone); parent file bit-identical")
    assert node < parent_alone - 0.25, (node, parent_alone)
    assert abs(node - record.metrics["eval_loss"]) < 1e-4  # served = what training measured


def test_train_parent_from_the_cli(tmp_path, capsys):
    store = tmp_path / "store"
    rev_train, rev_eval = write_data(tmp_path / "reverse", n=16, seed=0)
    model_dir = save_tiny_base(tmp_path / "tiny", VOCAB)
    base = ["train", "--model", str(model_dir), "--data", str(rev_train), "--eval",
            str(rev_eval), "--max-steps", "2", "--batch-size", "4", "--eval-examples", "0",
            "--max-length", "64", "--store", str(store)]
    assert main([*base, "--out", str(tmp_path / "a"), "--node", "support", "--rank", "2"]) == 0
    assert main([*base, "--out", str(tmp_path / "b"), "--parent", "support", "--node",
                 "support/fr", "--rank", "1"]) == 0
    assert main(["tree", "--store", str(store), "show"]) == 0
    out = capsys.readouterr().out
    assert "└── fr" in out and "2 adapter(s)" in out
    assert main([*base, "--out", str(tmp_path / "c"), "--parent", "support", "--node",
                 "elsewhere/x"]) == 2
    assert "support/<name>" in capsys.readouterr().err
    assert main(["tree", "--store", str(store), "export", "support/fr",
                 str(tmp_path / "flat")]) == 0
    assert (tmp_path / "flat" / "adapter_model.safetensors").is_file()


def test_fused_jobs_refuse_a_parent_and_grow_with_the_reason(tmp_path):
    from loratree.train.many import ManyConfig

    train_path, eval_path = write_data(tmp_path / "d", n=8)
    solo = dict(data=str(train_path), eval_data=str(eval_path))
    jobs = (TrainConfig(out=str(tmp_path / "a"), **solo),
            TrainConfig(out=str(tmp_path / "b"), parent="support", **solo))
    with pytest.raises(ValueError, match=r"tree node .* trains solo"):
        ManyConfig(("a", "b"), jobs)
    jobs = (TrainConfig(out=str(tmp_path / "a"), **solo),
            TrainConfig(out=str(tmp_path / "b"), grow=True, **solo))
    with pytest.raises(ValueError, match=r"grow .* runs solo"):
        ManyConfig(("a", "b"), jobs)
