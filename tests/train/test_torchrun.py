"""Two processes under real torchrun (gloo) train like one process with the same batch."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loratree.train.metrics import read_metrics


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


@pytest.mark.skipif(
    shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
    reason="torchrun is not installed beside this python",
)
def test_two_process_torchrun_matches_one_process(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    single, multi = tmp_path / "one" / "out", tmp_path / "two" / "out"
    args = ["--steps", "5", "--batch", "4", "--dropout", "0"]
    subprocess.run(
        [sys.executable, "-m", "tests.train.driver", str(single), *args],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "tests.train.driver",
            str(multi),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _losses(single), _losses(multi)
    assert sorted(two) == [1, 2, 3, 4, 5]
    for step, loss in one.items():
        assert two[step] == pytest.approx(loss, rel=1e-5), step
    assert (multi / "adapter_model.safetensors").is_file()
