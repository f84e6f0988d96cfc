"""``loratree train-many`` from the command line, alone and under real torchrun (gloo)."""

import os
import shutil
import subprocess
import sys

import pytest

from loratree.models.tiny import tiny_llama, tiny_tokenizer
from loratree.train.metrics import read_metrics
from tests.train.driver import write_data

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))


def _jobs_toml(tmp_path, out):
    base = tmp_path / "base"
    if not base.exists():
        tiny_llama(vocab=64).save_pretrained(base)
        tiny_tokenizer(64).save_pretrained(base)
    lines = [f'[defaults]\nmodel = "{base}"\nmax_steps = 4\nbatch_size = 4\nmax_length = 32\n'
             'warmup_steps = 1\neval_examples = 2\nmax_new_tokens = 4\neval_every = 4\n']
    for i, (name, rank, targets) in enumerate((("one", 2, '["q_proj", "v_proj"]'),
                                               ("two", 4, '["all-linear"]'))):
        train, held = write_data(tmp_path / f"data-{name}", n=16, seed=i)
        lines.append(f'[[job]]\nname = "{name}"\ndata = "{train}"\neval_data = "{held}"\n'
                     f'out = "{out / name}"\nrank = {rank}\ntargets = {targets}\nlr = 5e-3\n')
    path = tmp_path / f"{out.name}.toml"
    path.write_text("\n".join(lines))
    return path


def _losses(out):
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def test_train_many_command_trains_every_job(tmp_path):
    out = tmp_path / "alone"
    done = subprocess.run([sys.executable, "-m", "loratree.cli.main", "train-many",
                           str(_jobs_toml(tmp_path, out)), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 jobs in" in done.stdout and "one" in done.stdout and "two" in done.stdout
    for name in ("one", "two"):
        assert (out / name / "adapter_model.safetensors").is_file()
        assert (out / name / "loss.png").is_file()
        assert len(_losses(out / name)) == 4


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this python")
def test_two_processes_under_torchrun_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "loratree.cli.main", "train-many",
                    str(_jobs_toml(tmp_path, one)), "--no-progress"],
                   check=True, capture_output=True, timeout=300)
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m",
                           "loratree.cli.main", "train-many", str(_jobs_toml(tmp_path, two)),
                           "--no-progress"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("one", "two"):
        a, b = _losses(one / name), _losses(two / name)
        assert len(b) == 4 and b == pytest.approx(a, rel=1e-5), name
        assert (two / name / "adapter_model.safetensors").is_file()
