import json

import pytest
import torch

from loratree.cli.main import build_parser
from loratree.cli.train_cmd import config_from_args
from loratree.train import TrainConfig


def test_invalid_values_are_all_named_at_once():
    with pytest.raises(ValueError) as info:
        TrainConfig(data="x.jsonl", rank=0, lr=-1.0, precision="fp8")
    for name in ("rank", "lr", "precision"):
        assert name in str(info.value)


def test_toml_then_flags_override(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\ndata = "a.jsonl"\nrank = 4\ntargets = ["q_proj", "v_proj"]\n')
    args = build_parser().parse_args(
        ["train", "--config", str(toml), "--rank", "16", "--eval", "b.jsonl", "--rslora"]
    )
    config = config_from_args(args)
    assert config == TrainConfig(data="a.jsonl", rank=16, targets=("q_proj", "v_proj"),
                                 eval_data="b.jsonl", use_rslora=True)


def test_modules_to_save_flag_reaches_the_lora_config():
    args = build_parser().parse_args(["train", "--modules-to-save", "lm_head", "--targets",
                                      "q_proj"])
    config = config_from_args(args)
    assert config.modules_to_save == ("lm_head",)
    assert config.lora().modules_to_save == ("lm_head",)
    assert TrainConfig(modules_to_save="lm_head").modules_to_save == ("lm_head",)
    with pytest.raises(ValueError, match="modules_to_save needs method 'lora'"):
        TrainConfig(modules_to_save=("lm_head",), method="prefix")
    args = build_parser().parse_args(["train", "--lora-bias"])
    assert config_from_args(args).lora().lora_bias
    with pytest.raises(ValueError, match="use_dora and lora_bias cannot be combined"):
        TrainConfig(use_dora=True, lora_bias=True)


def test_unknown_toml_key_is_named(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('data = "a.jsonl"\nrnak = 4\n')
    with pytest.raises(ValueError, match="rnak"):
        TrainConfig.from_toml(toml)


def test_config_is_json_serializable():
    import json

    assert json.loads(json.dumps(TrainConfig(data="a.jsonl").to_dict()))["rank"] == 8


def test_python_api_trains_from_records(tmp_path):
    from loratree.models.tiny import tiny_llama, tiny_tokenizer
    from loratree.train import train

    records = [{"prompt": "w5 w6", "completion": "w6 w5"}, {"prompt": "w7", "completion": "w7"}]
    result = train(TrainConfig(out=str(tmp_path / "a"), max_steps=2, batch_size=2, rank=2),
                   model=tiny_llama(vocab=64), tokenizer=tiny_tokenizer(64), rows=records,
                   eval_rows=records, progress=False)
    assert result.steps == 2 and "eval_loss" in result.eval and result.eval_seconds > 0
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    routing = json.loads((tmp_path / "a" / "routing.json").read_text())
    assert routing["n_prompts"] == 2 and len(routing["centroid"]) == 32
    with pytest.raises(ValueError, match="no training data"):
        train(TrainConfig(out=str(tmp_path / "b")), model=tiny_llama(vocab=64),
              tokenizer=tiny_tokenizer(64))


@pytest.mark.parametrize("method,precision", [("full", "fp32"), ("lora", "bf16"),
                                              ("prefix", "fp32"), ("prefix", "bf16")])
def test_full_fine_tuning_and_bf16_runs_learn(tmp_path, method, precision):
    from loratree.models.tiny import tiny_llama, tiny_tokenizer
    from loratree.train import train
    from loratree.train.metrics import read_metrics

    records = [{"prompt": f"w{i} w{i + 1}", "completion": f"w{i + 1} w{i}"} for i in range(5, 21)]
    model = tiny_llama(vocab=64)
    result = train(TrainConfig(out=str(tmp_path / "a"), max_steps=12, batch_size=4, lr=3e-3,
                               method=method, precision=precision, save_every=4, keep_last=2),
                   model=model, tokenizer=tiny_tokenizer(64), rows=records, progress=False)
    losses = [r["loss"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "loss" in r]
    assert result.steps == 12 and losses[-1] < losses[0]
    kept = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert kept == ["step-00000008", "step-00000012"]
    if method == "full":
        assert all(p.requires_grad for p in model.parameters())
        assert (tmp_path / "a" / "model" / "config.json").is_file()
    if method == "prefix":
        config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
        assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 20


def test_device_is_checked_and_a_missing_gpu_is_a_clear_error():
    from loratree.train import distributed

    with pytest.raises(ValueError, match="device must be"):
        TrainConfig(device="gpu0")
    assert distributed.init("cpu").device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            distributed.init("cuda")
