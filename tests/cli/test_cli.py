"""The CLI does what the Python API does: run it as a user would, in a subprocess."""

import json
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM

from loratree import surgery
from loratree.adapters import save_adapter
from loratree.config import LoraConfig
from loratree.models.tiny import tiny_llama
from tests.conftest import randomize_slot


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "loratree.cli.main", *args],
        capture_output=True, text=True, timeout=300, cwd=cwd,
    )


def _tiny_dir(tmp_path):
    path = tmp_path / "base"
    tiny_llama().save_pretrained(path)
    return path


def test_inspect_prints_layers_and_the_rank_plane(tmp_path):
    out = _cli("inspect", str(_tiny_dir(tmp_path)), "--targets", "q_proj,v_proj",
               "--ranks", "1,8", "--plot", str(tmp_path / "plane.png"))
    assert out.returncode == 0, out.stderr
    model = tiny_llama()
    _, params, _ = surgery.adapter_size(model, ("q_proj", "v_proj"), 8)
    assert f"{params:,}" in out.stdout
    assert "q_proj" in out.stdout and "all-linear" in out.stdout
    assert (tmp_path / "plane.png").read_bytes()[:4] == b"\x89PNG"


def test_adapter_size_counts_match_an_injected_adapter():
    model = tiny_llama()
    layers, params, _ = surgery.adapter_size(model, ("all-linear",), 4)
    report = surgery.inject(model, LoraConfig(rank=4, targets=("all-linear",)))
    assert (layers, params) == (len(report.layers), report.trainable_params)


def test_adapter_size_predicts_the_saved_file_size(tmp_path):
    model = tiny_llama()
    _, _, size = surgery.adapter_size(model, ("q_proj", "v_proj"), 4)
    surgery.inject(model, LoraConfig(rank=4, targets=("q_proj", "v_proj")))
    saved = save_adapter(model, tmp_path / "a") / "adapter_model.safetensors"
    assert abs(saved.stat().st_size - size) <= 64


def test_merge_writes_a_model_plain_transformers_loads(tmp_path):
    base_dir = _tiny_dir(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    surgery.inject(model, LoraConfig(rank=4, targets=("all-linear",)))
    randomize_slot(model, 0)
    save_adapter(model, tmp_path / "adapter")
    ids = torch.randint(0, 128, (2, 7))
    expected = model(ids).logits
    out = _cli("merge", str(base_dir), str(tmp_path / "adapter"), str(tmp_path / "merged"))
    assert out.returncode == 0, out.stderr
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=0)


def test_cli_errors_are_clear_and_not_tracebacks(tmp_path):
    out = _cli("merge", str(_tiny_dir(tmp_path)), str(tmp_path / "missing"), str(tmp_path / "o"))
    assert out.returncode == 2
    assert "error" in out.stderr and "Traceback" not in out.stderr


def test_train_command_end_to_end_and_bad_rows(tmp_path):
    from loratree.models.tiny import tiny_tokenizer
    from tests.train.driver import write_data

    base = tmp_path / "base"
    tiny_llama(vocab=64).save_pretrained(base)
    tiny_tokenizer(64).save_pretrained(base)
    train, held_out = write_data(tmp_path / "data")
    out = tmp_path / "adapter"
    common = ["--model", str(base), "--eval", str(held_out), "--out", str(out),
              "--max-steps", "3", "--batch-size", "4", "--rank", "2", "--eval-examples", "2",
              "--max-new-tokens", "4"]
    done = _cli("train", "--data", str(train), *common)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trained 3 steps" in done.stdout
    assert (out / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(train.read_text().splitlines()[0] + '\n{"prompt": "w5"}\n')
    failed = _cli("train", "--data", str(bad), *common)
    assert failed.returncode == 2 and "bad.jsonl:2" in failed.stderr
    skipped = _cli("train", "--data", str(bad), "--skip-bad-rows", *common)
    assert skipped.returncode == 0, skipped.stderr[-2000:]


def test_quantize_then_merge_both_ways_with_reported_errors(tmp_path):
    from loratree.models import load_base
    from loratree.models.tiny import tiny_tokenizer
    from tests.train.driver import write_data

    base = tmp_path / "base"
    tiny_llama(vocab=64).save_pretrained(base)
    tiny_tokenizer(64).save_pretrained(base)
    _, held_out = write_data(tmp_path / "data")
    done = _cli("quantize", str(base), str(tmp_path / "q"), "--exclude", "k_proj")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bits per parameter" in done.stdout
    qmodel, _ = load_base(tmp_path / "q")
    nf4 = surgery.nf4_layers(qmodel)
    assert nf4 and not any(n.endswith("k_proj") for n in nf4)

    surgery.inject(qmodel, LoraConfig(rank=4, targets=("all-linear",)))
    randomize_slot(qmodel, 0, std=0.05)
    save_adapter(qmodel, tmp_path / "adapter")
    ids = torch.randint(0, 64, (2, 9))
    expected = qmodel(ids).logits

    to_float = _cli("merge", str(tmp_path / "q"), str(tmp_path / "adapter"),
                    str(tmp_path / "merged-float"), "--eval-data", str(held_out))
    assert to_float.returncode == 0, to_float.stderr[-2000:]
    assert "to float: weight error against the float merge max" in to_float.stdout
    assert f"eval loss on {held_out}" in to_float.stdout
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged-float")
    torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=0)

    to_nf4 = _cli("merge", str(tmp_path / "q"), str(tmp_path / "adapter"),
                  str(tmp_path / "merged-nf4"), "--to", "nf4")
    assert to_nf4.returncode == 0, to_nf4.stderr[-2000:]
    assert "to nf4: weight error" in to_nf4.stdout
    requantized, _ = load_base(tmp_path / "merged-nf4")
    assert surgery.nf4_layers(requantized).keys() == nf4.keys()
    assert not surgery.lora_layers(requantized)

    refused = _cli("merge", str(base), str(tmp_path / "adapter"), str(tmp_path / "x"),
                   "--to", "nf4")
    assert refused.returncode == 2 and "--to nf4 needs an NF4 base" in refused.stderr


def test_train_method_prefix_writes_a_peft_prefix_adapter(tmp_path):
    import json

    import peft

    from loratree.models.tiny import tiny_tokenizer
    from tests.train.driver import write_data

    base = tmp_path / "base"
    tiny_llama(vocab=64).save_pretrained(base)
    tiny_tokenizer(64).save_pretrained(base)
    train, held_out = write_data(tmp_path / "data")
    out = tmp_path / "prefix"
    done = _cli("train", "--model", str(base), "--data", str(train), "--eval", str(held_out),
                "--out", str(out), "--method", "prefix", "--virtual-tokens", "4",
                "--prefix-projection", "--max-steps", "3", "--batch-size", "4",
                "--eval-examples", "2", "--max-new-tokens", "4", "--save-every", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 4
    assert config["prefix_projection"] is True
    assert (out / "checkpoints" / "step-00000003").is_dir()
    model = AutoModelForCausalLM.from_pretrained(base)
    theirs = peft.PeftModel.from_pretrained(model, out).eval()
    ids = torch.randint(0, 60, (1, 6))
    ours = AutoModelForCausalLM.from_pretrained(base)
    from loratree.adapters import load_adapter

    load_adapter(ours, out)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=0)


def _served(tmp_path):
    from loratree.adapters import AdapterStore
    from loratree.models.tiny import tiny_tokenizer

    base = tmp_path / "base"
    model = tiny_llama(vocab=64)
    model.generation_config.eos_token_id = None
    model.save_pretrained(base)
    tiny_tokenizer(64).save_pretrained(base)
    surgery.inject(model, LoraConfig(rank=2, targets=("q_proj", "v_proj")))
    randomize_slot(model, 0, std=0.5)
    AdapterStore(tmp_path / "store").save("team/a", model, 0)
    return base, model


def test_generate_streams_the_adapters_greedy_tokens(tmp_path):
    base, model = _served(tmp_path)
    ids = [5, 6, 7]
    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False,
                              pad_token_id=0)[0, 3:].tolist()
    for tuning in ("none", "all"):  # CPU tuning changes the speed, never the tokens
        out = _cli("generate", "w5 w6 w7", "--raw", "--model", str(base), "--store",
                   str(tmp_path / "store"), "--adapter", "team/a", "--max-new-tokens", "4",
                   "--cpu-tuning", tuning)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split() == [f"w{t}" for t in want]
        assert "team/a: 4 tokens, length" in out.stderr
    missing = _cli("generate", "w5", "--raw", "--model", str(base), "--store",
                   str(tmp_path / "store"), "--adapter", "nope")
    assert missing.returncode == 2 and "nope" in missing.stderr


def test_chat_switches_adapters_and_reports_the_switch_time(tmp_path):
    base, _ = _served(tmp_path)
    stdin = "w5 w6\n/adapters\n/adapter team/a\nw7\n/adapter ../x\n/base\nw8\n/quit\n"
    out = subprocess.run(
        [sys.executable, "-m", "loratree.cli.main", "chat", "--model", str(base), "--store",
         str(tmp_path / "store"), "--max-new-tokens", "3"],
        input=stdin, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert any(line.startswith("__base__> ") for line in lines)
    assert any(line.startswith("team/a> ") for line in lines)
    assert any("team/a  lora r=2" in line for line in lines)
    assert any(line.startswith("(switched to team/a in ") for line in lines)
    assert any("cannot switch" in line for line in lines)


def test_store_command_adds_lists_shows_and_removes(tmp_path):
    from loratree import surgery
    from loratree.adapters import save_adapter
    from loratree.config import LoraConfig

    model = tiny_llama()
    surgery.inject(model, LoraConfig(rank=2, targets=("q_proj", "v_proj")))
    src = save_adapter(model, tmp_path / "src", 0)
    store = ["--store", str(tmp_path / "store")]
    added = _cli("store", *store, "add", "team/dates", str(src))
    assert added.returncode == 0 and "added team/dates: lora, rank 2" in added.stdout
    listed = _cli("store", *store, "list")
    assert "team/dates" in listed.stdout and "1 adapter(s)" in listed.stdout
    shown = _cli("store", *store, "show", "team/dates")
    assert json.loads(shown.stdout)["targets"] and str(tmp_path) not in shown.stdout
    hostile = _cli("store", *store, "add", "../escape", str(src))
    assert hostile.returncode == 2 and "escape" in hostile.stderr
    assert not (tmp_path / "escape").exists()
    assert _cli("store", *store, "remove", "team/dates").returncode == 0
    missing = _cli("store", *store, "show", "team/dates")
    assert missing.returncode == 2 and "team/dates" in missing.stderr


def test_store_list_names_a_damaged_entry_and_add_still_works(tmp_path):
    from loratree import surgery
    from loratree.adapters import save_adapter
    from loratree.config import LoraConfig

    model = tiny_llama()
    surgery.inject(model, LoraConfig(rank=2, targets=("q_proj", "v_proj")))
    src = save_adapter(model, tmp_path / "src", 0)
    store = ["--store", str(tmp_path / "store")]
    assert _cli("store", *store, "add", "broken", str(src)).returncode == 0
    cfg = tmp_path / "store" / "broken" / "@" / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "r": "x"}))
    listed = _cli("store", *store, "list")
    assert listed.returncode == 0, listed.stderr
    assert "broken" in listed.stdout and "DAMAGED" in listed.stdout
    assert "loratree store add broken DIR" in listed.stdout and "1 damaged" in listed.stdout
    added = _cli("store", *store, "add", "fine", str(src))
    assert added.returncode == 0, added.stderr


def test_serve_ray_without_ray_names_the_extra(tmp_path, monkeypatch, capsys):
    from loratree.cli.main import main

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    assert main(["serve", "--ray", "--replicas", "2", "--store", str(tmp_path)]) == 2
    assert "pip install loratree[ray]" in capsys.readouterr().err
