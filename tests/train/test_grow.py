"""Rank growth: the function and the old optimizer state survive growing, and a run with
``grow`` grows, logs it, stops when growing stops helping, saves and resumes."""

import json

import pytest
import torch

from loratree import surgery
from loratree.adapters import load_adapter
from loratree.config import LoraConfig
from loratree.errors import RankTooLargeError
from loratree.models.tiny import random_tokens, tiny_convnet, tiny_gpt2, tiny_llama, tiny_tokenizer
from loratree.train import TrainConfig, fit, save, setup, train
from loratree.train.grow import Grower
from loratree.train.metrics import MetricsLog, read_metrics
from tests.conftest import randomize_slot
from tests.train.driver import write_data

MODELS = {
    "llama": (tiny_llama, ("all-linear", "embed_tokens")),  # Linear and Embedding
    "gpt2": (tiny_gpt2, ("all-linear",)),  # transformers' Conv1D (fan_in_fan_out)
    "convnet": (tiny_convnet, ("embed", "conv1d", "conv2d", "proj")),  # Conv1d and Conv2d
}


def _logits(m, ids):
    out = m(ids)
    return out.logits if hasattr(out, "logits") else out


def _adapted(kind, rslora=False):
    build, targets = MODELS[kind]
    m = build()
    surgery.inject(m, LoraConfig(rank=4, alpha=8, targets=targets, use_rslora=rslora))
    randomize_slot(m, 0)  # nonzero B: growing a fresh (B = 0) adapter would prove nothing
    return m


def _train_steps(m, optimizer, n, ids):
    for _ in range(n):
        _logits(m, ids).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("kind", list(MODELS))
def test_growing_keeps_the_logits_and_the_scale(kind, rslora):
    m = _adapted(kind, rslora)
    ids = random_tokens(128, 2, 8)
    layers = surgery.lora_layers(m)
    scales = {n: layer.specs[0].scale for n, layer in layers.items()}
    with torch.no_grad():
        before = _logits(m, ids)
    report = surgery.grow_slot(m, 0, factor=2)
    with torch.no_grad():
        after = _logits(m, ids)
    assert (after - before).abs().max().item() <= 1e-6
    assert report.old_rank == 4 and report.new_rank == 8 and set(report.layers) == set(layers)
    for n, layer in layers.items():
        assert layer.specs[0].rank == 8 and layer.lora_a[0].shape[0] == 8
        assert layer.lora_b[0].shape[1] == 8
        assert layer.specs[0].scale == pytest.approx(scales[n], rel=1e-12)
        assert layer.lora_a[0][4:].abs().sum() > 0  # new A rows are random, not zero


@pytest.mark.parametrize("amsgrad", [False, True])
def test_growing_keeps_the_optimizer_state_of_old_entries(amsgrad):
    m = _adapted("llama")
    params = list(surgery.adapter_parameters(m, 0))
    optimizer = torch.optim.AdamW(params, lr=1e-3, amsgrad=amsgrad)
    ids = random_tokens(128, 2, 8)
    _train_steps(m, optimizer, 2, ids)
    keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    old = {p: {k: optimizer.state[p][k].clone() for k in keys} for p in params}
    steps = {p: optimizer.state[p]["step"].clone() for p in params}
    with torch.no_grad():
        before = _logits(m, ids)
    surgery.grow_slot(m, 0, 2, optimizer)
    with torch.no_grad():
        assert (_logits(m, ids) - before).abs().max().item() <= 1e-6
    layers = surgery.lora_layers(m).values()
    grown = list(surgery.adapter_parameters(m, 0))
    assert all(p is q for p, q in zip(grown, params, strict=True))  # the same objects
    for layer in layers:
        for p, is_a in ((layer.lora_a[0], True), (layer.lora_b[0], False)):
            state = optimizer.state[p]
            assert torch.equal(state["step"], steps[p])
            for k in keys:
                assert state[k].shape == p.shape
                kept, new = (state[k][:4], state[k][4:]) if is_a else (
                    state[k][:, :4], state[k][:, 4:])
                assert torch.equal(kept, old[p][k]), k
                assert not new.any(), k
    loss_before = _logits(m, ids).float().pow(2).mean().item()
    _train_steps(m, optimizer, 3, ids)  # the optimizer keeps going on the grown tensors
    assert _logits(m, ids).float().pow(2).mean().item() < loss_before


def test_mixed_batches_after_growth_match_each_row_alone():
    m = tiny_llama()
    for seed in (1, 2):
        surgery.inject(m, LoraConfig(rank=2, alpha=4, targets=("all-linear",)))
        randomize_slot(m, seed - 1, seed=seed)
    ids = random_tokens(128, 3, 4)
    ctx = surgery.context(m)
    rows = torch.tensor([0, 1, -1])
    with torch.no_grad():
        with ctx.use(rows):
            before = _logits(m, ids)  # few tokens: the stacked path, which caches factors
        surgery.grow_slot(m, 0)
        with ctx.use(rows):
            assert (_logits(m, ids) - before).abs().max().item() <= 1e-6
        randomize_slot(m, 0, seed=3)  # the new rows and columns now matter
        with ctx.use(rows):
            mixed = _logits(m, ids)
        for i, slot in enumerate(rows.tolist()):
            with ctx.use(slot):
                torch.testing.assert_close(mixed[i], _logits(m, ids[i : i + 1])[0],
                                           atol=1e-5, rtol=0)
    assert all(layer.specs[0].rank == 4 and layer.specs[1].rank == 2
               for layer in surgery.lora_layers(m).values())


def test_growth_is_refused_past_the_maximum_and_on_a_merged_slot():
    m = _adapted("llama")
    a = {n: layer.lora_a[0].detach().clone() for n, layer in surgery.lora_layers(m).items()}
    with pytest.raises(RankTooLargeError, match="maximum rank 6"):
        surgery.grow_slot(m, 0, 2, max_rank=6)
    surgery.merge(m, 0)
    with pytest.raises(RuntimeError, match="merged"):
        surgery.grow_slot(m, 0)
    for n, layer in surgery.lora_layers(m).items():
        assert layer.specs[0].rank == 4 and torch.equal(layer.lora_a[0], a[n])
    with pytest.raises(ValueError, match="adapts no layer"):
        surgery.grow_slot(m, 3)


def test_policy_grows_on_a_stall_and_stops_when_growing_does_not_help():
    g = Grower(patience=1, tolerance=0.05, max_rank=64, ranks=[4])
    assert g.decide(3.0) == "train"
    assert g.decide(2.5) == "train"
    assert g.decide(2.49) == "grow"  # 0.01 is within the tolerance
    g.ranks.append(8)
    g.stale, g.helped = 0, False
    assert g.decide(2.3) == "train"  # the growth helped
    assert g.decide(2.31) == "grow"
    g.ranks.append(16)
    g.stale, g.helped = 0, False
    assert g.decide(2.29) == "stop" and "rank 16 did not lower" in g.stopped
    patient = Grower(patience=2, tolerance=0.0, max_rank=4, ranks=[4])
    assert [patient.decide(x) for x in (1.0, 1.0, 1.0)] == ["train", "train", "stop"]
    assert "grow_max_rank 4" in patient.stopped


def _config(tmp_path, out, **kw):
    train_path, eval_path = write_data(tmp_path / "data")
    settings = dict(data=str(train_path), eval_data=str(eval_path), out=str(tmp_path / out),
                    rank=2, alpha=4, batch_size=4, max_length=32, lr=5e-3, warmup_steps=2,
                    eval_examples=0, grow=True, grow_tolerance=100.0)
    return TrainConfig(**{**settings, **kw})


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread for these runs, given back after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(config, stop_after=None, resume=False):
    run = setup(config, model=tiny_llama(vocab=64), tokenizer=tiny_tokenizer(64))

    def stop(step, loss):
        if step == stop_after:
            raise KeyboardInterrupt

    try:
        result = fit(run, resume=resume, progress=False, on_step=stop)
    except KeyboardInterrupt:
        return run, None
    save(run)
    return run, result


def _records(out, key):
    return [r for r in read_metrics(out / "metrics.jsonl") if key in r]


def test_training_continues_after_growth_and_the_loss_keeps_falling(tmp_path):
    # a tolerance of 100 makes every evaluation after the first a stall: growth at the
    # second evaluation (step 12); the third (step 18) is the last, so no stop
    config = _config(tmp_path, "out", max_steps=18, eval_every=6, save_every=6)
    run, result = _run(config)
    assert result.ranks == (2, 4) and not result.stopped_early and result.steps == 18
    out = tmp_path / "out"
    assert [(r["step"], r["grow_from"], r["grow_to"]) for r in _records(out, "grow_to")] == [
        (12, 2, 4)]
    loss = {r["step"]: r["loss"] for r in _records(out, "loss")}
    evals = {r["step"]: r["eval_loss"] for r in _records(out, "eval_loss")}
    assert sorted(loss) == list(range(1, 19))
    assert evals[18] < evals[12] < evals[6]
    before = sum(loss[s] for s in range(7, 13)) / 6
    after = sum(loss[s] for s in range(13, 19)) / 6
    assert after < before
    assert all(layer.specs[0].rank == 4 for layer in surgery.lora_layers(run.model).values())


def test_run_stops_when_growing_stops_helping_and_the_adapter_loads_back(tmp_path):
    config = _config(tmp_path, "out", max_steps=40, eval_every=2, save_every=10)
    run, result = _run(config)
    # step 2 sets the best, step 4 stalls: grow; step 6 stalls again: the growth did not help
    assert result.ranks == (2, 4) and result.stopped_early and result.steps == 6
    out = tmp_path / "out"
    assert [r["step"] for r in _records(out, "grow_to")] == [4]
    stops = _records(out, "stopped_early")
    assert [r["step"] for r in stops] == [6] and "did not lower" in stops[0]["stopped_early"]
    assert (out / "checkpoints" / "step-00000006").is_dir()  # the stop is checkpointed
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == pytest.approx(8.0)
    run.model.eval()
    fresh = tiny_llama(vocab=64)
    slot = load_adapter(fresh, out)
    ids = random_tokens(64, 2, 8)
    with torch.no_grad(), surgery.context(fresh).use(slot):
        loaded = fresh(ids).logits
    with torch.no_grad():
        trained = run.model(ids).logits
    assert (loaded - trained).abs().max().item() <= 1e-6
    # resuming a stopped run does not train on
    _, again = _run(config, resume=True)
    assert again.stopped_early and again.steps == 6 and again.ranks == (2, 4)


def test_max_rank_is_respected(tmp_path):
    config = _config(tmp_path, "out", max_steps=40, eval_every=2, grow_max_rank=3)
    _, result = _run(config)
    assert result.ranks == (2,) and result.stopped_early and result.steps == 4
    assert not _records(tmp_path / "out", "grow_to")
    assert "grow_max_rank 3" in _records(tmp_path / "out", "stopped_early")[0]["stopped_early"]
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 2


def test_resume_after_a_growth_regrows_and_continues(tmp_path):
    # patience 2: growth at step 6 (the third evaluation); the kill comes at step 7
    settings = dict(max_steps=10, eval_every=2, save_every=2, grow_patience=2, dropout=0.0)
    _, straight = _run(_config(tmp_path, "a", **settings))
    _, killed = _run(_config(tmp_path, "b", **settings), stop_after=7)
    assert killed is None
    run, resumed = _run(_config(tmp_path, "b", **settings), resume=True)
    assert resumed.ranks == straight.ranks == (2, 4) and resumed.steps == 10
    assert all(layer.specs[0].rank == 4 for layer in surgery.lora_layers(run.model).values())
    assert [r["step"] for r in _records(tmp_path / "b", "grow_to")] == [6]
    losses = {r["step"]: r["loss"] for r in _records(tmp_path / "b", "loss")}
    want = {r["step"]: r["loss"] for r in _records(tmp_path / "a", "loss")}
    assert losses == want  # and, as for any run, the resumed one matches the straight one


def test_grow_needs_lora_eval_data_and_a_consistent_max_rank(tmp_path):
    with pytest.raises(ValueError, match="grow needs method 'lora'"):
        TrainConfig(grow=True, method="prefix")
    with pytest.raises(ValueError, match="grow_max_rank 4 must be >= rank 8"):
        TrainConfig(grow=True, rank=8, grow_max_rank=4)
    with pytest.raises(ValueError, match="grow_patience must be a positive int"):
        TrainConfig(grow_patience=0)
    with pytest.raises(ValueError, match="grow_tolerance"):
        TrainConfig(grow_tolerance=-1.0)
    records = [{"prompt": "w5 w6", "completion": "w6 w5"}]
    with pytest.raises(ValueError, match="eval loss"):
        train(TrainConfig(out=str(tmp_path / "a"), max_steps=2, batch_size=1, rank=2,
                          grow=True),
              model=tiny_llama(vocab=64), tokenizer=tiny_tokenizer(64), rows=records,
              progress=False)


def test_grow_flags_come_from_the_config():
    import argparse

    from loratree.cli.train_cmd import add_parser, config_from_args

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["train", "--grow", "--grow-max-rank", "32", "--grow-patience",
                              "2", "--grow-tolerance", "0.01", "--rank", "4"])
    config = config_from_args(args)
    assert (config.grow, config.grow_max_rank, config.grow_patience, config.grow_tolerance,
            config.rank) == (True, 32, 2, 0.01, 4)


def test_an_improving_evaluation_neither_grows_nor_logs(tmp_path):
    g = Grower(patience=1, tolerance=0.0, max_rank=8, ranks=[2])
    log = MetricsLog(tmp_path / "m.jsonl")
    m = tiny_llama(vocab=64)
    surgery.inject(m, LoraConfig(rank=2, alpha=4, targets=("all-linear",)))
    assert not g.after_eval(1.0, 1, m, torch.optim.AdamW(surgery.adapter_parameters(m, 0)), log)
    assert not log.path.exists()


def test_grow_is_refused_under_torchrun(tmp_path, monkeypatch):
    from loratree.train import distributed

    monkeypatch.setattr(distributed, "init",
                        lambda device=None: distributed.Dist(rank=1, world=2,
                                                             device=torch.device("cpu")))
    with pytest.raises(ValueError, match="grow runs in one process"):
        setup(_config(tmp_path, "out"), model=tiny_llama(vocab=64),
              tokenizer=tiny_tokenizer(64))
