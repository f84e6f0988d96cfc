"""``loratree sweep`` from the command line on a tiny model directory."""

import json

from loratree.cli.main import main
from tests.conftest import save_tiny_base
from tests.train.driver import write_data


def test_sweep_command_writes_table_plot_and_recommendation(tmp_path, capsys):
    base = save_tiny_base(tmp_path / "base")
    train, held = write_data(tmp_path / "data", n=12, seed=1)
    out = tmp_path / "sweep"
    code = main(["sweep", "--data", str(train), "--eval", str(held), "--model", str(base),
                 "--targets", "q,v;up_proj,down_proj", "--ranks", "1,4", "--steps", "3",
                 "--batch-size", "4", "--lr", "5e-3", "--max-length", "32",
                 "--eval-examples", "2", "--max-new-tokens", "3", "--timing-steps", "1",
                 "--tolerance", "5", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "recommended:" in printed and "sweep.png" in printed
    assert "up_proj,down_proj r=4" in printed and "full fine-tuning" in printed
    blob = json.loads((out / "sweep.json").read_text())
    assert [r["name"] for r in blob["rows"]] == ["q,v r=1", "q,v r=4", "up_proj,down_proj r=1",
                                                  "up_proj,down_proj r=4", "full fine-tuning"]
    assert blob["config"]["tolerance"] == 5.0 and blob["config"]["model"] == str(base)
    assert (out / "sweep.png").is_file() and (out / "sweep.md").is_file()
    assert (out / "runs" / "up_proj-down_proj-r4" / "adapter_model.safetensors").is_file()


def test_no_full_and_a_bad_rank(tmp_path, capsys):
    train, held = write_data(tmp_path / "data", n=4, seed=1)
    code = main(["sweep", "--data", str(train), "--eval", str(held), "--ranks", "1,0",
                 "--no-full", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "ranks must be positive ints" in capsys.readouterr().err


def test_a_target_set_that_matches_nothing_fails_before_training(tmp_path, capsys):
    base = save_tiny_base(tmp_path / "base")
    train, held = write_data(tmp_path / "data", n=4, seed=1)
    out = tmp_path / "o"
    code = main(["sweep", "--data", str(train), "--eval", str(held), "--model", str(base),
                 "--targets", "q,v;nope_proj", "--ranks", "1", "--out", str(out),
                 "--no-progress"])
    assert code == 2
    assert "target set 'nope_proj'" in capsys.readouterr().err
    assert not (out / "runs").exists()
