"""A sweep on a tiny model: one row per grid point plus full fine-tuning, exact parameter
counts and file sizes, the plot, the reports, and a fused point equal to its solo run."""

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from loratree.adapters.safetensors_io import read_safetensors
from loratree.models.tiny import tiny_llama, tiny_tokenizer
from loratree.sweep import SweepConfig, point_config, recommend, run_sweep
from loratree.train import train
from tests.train.driver import write_data

VOCAB = 64
SETS = (("q,v", ("q_proj", "v_proj")), ("all-linear", ("all-linear",)))
RANKS = (1, 2)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    train_path, eval_path = write_data(root / "data", n=16, seed=0)
    config = SweepConfig(data=str(train_path), eval_data=str(eval_path), out=str(root / "out"),
                         target_sets=SETS, ranks=RANKS, steps=4, batch_size=4, lr=5e-3,
                         full_lr=1e-3, max_length=32, eval_examples=4, max_new_tokens=4,
                         timing_steps=2)
    result = run_sweep(config, model=tiny_llama(vocab=VOCAB), tokenizer=tiny_tokenizer(VOCAB),
                       progress=False)
    return config, result


def _exact_params(targets: tuple[str, ...], rank: int) -> int:
    """sum of r * (in + out) over the adapted linear layers, from a fresh model's shapes."""
    model = tiny_llama(vocab=VOCAB)
    head = model.get_output_embeddings()
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if targets == ("all-linear",):
            chosen = module is not head
        else:
            chosen = name.rsplit(".", 1)[-1] in targets
        if chosen:
            total += rank * (module.in_features + module.out_features)
    return total


def test_one_row_per_point_plus_full(swept):
    _, result = swept
    names = [r.name for r in result.rows]
    assert names == ["q,v r=1", "q,v r=2", "all-linear r=1", "all-linear r=2",
                     "full fine-tuning"]
    for r in result.rows:
        assert r.error is None, r
        assert r.eval_loss is not None and r.eval_loss > 0
        assert r.exact_match is not None and 0.0 <= r.exact_match <= 1.0
        assert r.step_seconds is not None and r.step_seconds > 0
    assert set(result.seconds) == {"full", "lora", "timing", "total"}


def test_trainable_params_are_exact(swept):
    _, result = swept
    by_name = {r.name: r for r in result.rows}
    for set_name, targets in SETS:
        for rank in RANKS:
            assert by_name[f"{set_name} r={rank}"].trainable_params == \
                _exact_params(targets, rank)
    everything = sum(p.numel() for p in tiny_llama(vocab=VOCAB).parameters())
    assert by_name["full fine-tuning"].trainable_params == everything == result.model_params
    # the q,v r=1 count by hand: 2 layers x (q 32x32 + v 32->16) at r=1
    assert by_name["q,v r=1"].trainable_params == 2 * ((32 + 32) + (32 + 16))


def test_adapter_bytes_are_the_saved_files(swept):
    _, result = swept
    for r in result.rows:
        if r.full:
            files = list((Path(r.out) / "model").glob("*.safetensors"))
            assert files and r.adapter_bytes == sum(f.stat().st_size for f in files)
        else:
            file = Path(r.out) / "adapter_model.safetensors"
            assert r.adapter_bytes == file.stat().st_size
            tensors = read_safetensors(file)
            assert sum(t.numel() for t in tensors.values()) == r.trainable_params
        assert not (Path(r.out) / "checkpoints").exists()


def test_reports_and_plot(swept):
    config, result = swept
    out = Path(config.out)
    png = out / "sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
    text = (out / "sweep.md").read_text()
    assert "(recommended)" in text and "sweep.png" in text
    assert text.count("\n| ") == len(result.rows) + 1  # header + one line per row
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [r["name"] for r in rows] == [r.name for r in result.rows]
    assert [int(r["adapter_bytes"]) for r in rows] == [r.adapter_bytes for r in result.rows]
    blob = json.loads((out / "sweep.json").read_text())
    assert len(blob["rows"]) == len(result.rows) and blob["tolerance_points"] == 2.0
    assert blob["recommended"] == result.recommended.name
    assert result.recommended is recommend(result.rows, config.tolerance)


def test_a_fused_point_equals_its_solo_run(swept, tmp_path):
    config, result = swept
    row = next(r for r in result.rows if r.name == "all-linear r=2")
    solo = tmp_path / "solo"
    train(point_config(config, solo, rank=2, targets=("all-linear",)), progress=False,
          model=tiny_llama(vocab=VOCAB), tokenizer=tiny_tokenizer(VOCAB))
    a = read_safetensors(Path(row.out) / "adapter_model.safetensors")
    b = read_safetensors(solo / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a])
    ref = torch.cat([b[k].flatten() for k in a])
    assert float(torch.linalg.norm(diff) / torch.linalg.norm(ref)) <= 1e-5
