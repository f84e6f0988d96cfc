"""Crash safety: SIGKILL anywhere, resume, and get exactly the uninterrupted run."""

import subprocess
import sys

import pytest
import torch

from loratree.adapters.safetensors_io import read_safetensors
from loratree.train import checkpoint as ckpt
from loratree.train.metrics import read_metrics


def _driver(out, *args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "tests.train.driver", str(out), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc


def _losses(out):
    by_step = {}
    for r in read_metrics(out / "metrics.jsonl"):
        if "loss" in r:
            by_step[r["step"]] = r["loss"]
    return by_step


def test_killed_three_times_then_resumed_equals_uninterrupted(tmp_path):
    straight = tmp_path / "a" / "out"
    _driver(straight)
    broken = tmp_path / "b" / "out"
    killed = _driver(broken, "--kill-after", 4, check=False)
    assert killed.returncode == -9
    killed = _driver(broken, "--resume", "--kill-in-checkpoint", 6, check=False)
    assert killed.returncode == -9
    partial = list((broken / "checkpoints").glob(".step-00000006*.tmp"))
    assert partial, "the kill should have left a partial checkpoint behind"
    assert ckpt.latest_checkpoint(broken / "checkpoints").name == "step-00000003"
    killed = _driver(broken, "--resume", "--kill-after", 10, check=False)
    assert killed.returncode == -9
    _driver(broken, "--resume")
    want, got = _losses(straight), _losses(broken)
    assert sorted(got) == list(range(1, 13))
    assert got == want  # exact, per step
    a = read_safetensors(straight / "adapter_model.safetensors")
    b = read_safetensors(broken / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((broken / "checkpoints").glob(".*.tmp"))  # cleaned up by later saves


def test_nan_stops_at_a_named_step_and_last_checkpoint_is_good(tmp_path):
    out = tmp_path / "out"
    proc = _driver(out, "--nan-at", 5, check=False)
    assert proc.returncode != 0
    assert "NonFiniteError" in proc.stderr and "step 5" in proc.stderr
    latest = ckpt.latest_checkpoint(out / "checkpoints")
    assert latest is not None and latest.name == "step-00000003"
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        tensors = read_safetensors(latest / name)  # raises on NaN/Inf
        assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    resumed = _driver(out, "--resume")
    assert '"steps": 12' in resumed.stdout


@pytest.mark.parametrize("accum", [2])
def test_gradient_accumulation_matches_one_big_batch(tmp_path, accum):
    one = tmp_path / "one" / "out"
    two = tmp_path / "two" / "out"
    _driver(one, "--steps", 4, "--dropout", 0)
    _driver(two, "--steps", 4, "--accum", accum, "--dropout", 0)
    a, b = _losses(one), _losses(two)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5)


def test_sigterm_checkpoints_the_current_step_and_resume_is_exact(tmp_path):
    straight = tmp_path / "a" / "out"
    _driver(straight)
    stopped = tmp_path / "b" / "out"
    proc = _driver(stopped, "--term-after", 5)
    assert '"interrupted": true' in proc.stdout
    assert ckpt.latest_checkpoint(stopped / "checkpoints").name == "step-00000005"
    _driver(stopped, "--resume")
    assert _losses(stopped) == _losses(straight)


def test_prefix_run_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    from loratree.models.tiny import tiny_llama, tiny_tokenizer
    from loratree.train import TrainConfig, fit, save, setup
    from tests.train.driver import write_data

    train_path, _ = write_data(tmp_path / "data")

    def config(out):
        return TrainConfig(data=str(train_path), out=str(tmp_path / out), method="prefix",
                           virtual_tokens=3, prefix_projection=True, max_steps=4,
                           batch_size=4, lr=1e-2, save_every=2, warmup_steps=1)

    def run(out, stop_after=None, resume=False):
        r = setup(config(out), model=tiny_llama(vocab=64), tokenizer=tiny_tokenizer(64))

        def stop(step, loss):
            if step == stop_after:
                raise KeyboardInterrupt

        try:
            fit(r, resume=resume, progress=False, on_step=stop)
        except KeyboardInterrupt:
            return None
        return load_file(save(r) / "adapter_model.safetensors")["prompt_embeddings"]

    straight = run("a")
    assert run("b", stop_after=2) is None
    resumed = run("b", resume=True)
    assert torch.equal(straight, resumed)
