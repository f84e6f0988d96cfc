"""Fused multi-job training equals each job trained alone; a failing job stops alone; a
killed fused run resumes to the same per-job losses."""

import json
from pathlib import Path

import pytest
import torch

from loratree.adapters.safetensors_io import read_safetensors
from loratree.models.tiny import tiny_llama, tiny_tokenizer
from loratree.train import TrainConfig, train
from loratree.train.many import ManyConfig, fit_many, setup_many, train_many
from loratree.train.metrics import read_metrics
from tests.train.driver import write_data

STEPS = 20


def _jobs(tmp_path, lr_of=None, batch_size=None):
    """Three jobs of different ranks, targets, lrs, batch sizes (or one ``batch_size``)
    and data."""
    shapes = {
        "qv-r2": dict(rank=2, alpha=4, targets=("q_proj", "v_proj"), lr=5e-3, batch_size=4),
        "all-r4": dict(rank=4, alpha=8, targets=("all-linear",), lr=3e-3, batch_size=3),
        "mlp-r3": dict(rank=3, alpha=3, targets=("up_proj", "down_proj"), lr=8e-3,
                       batch_size=2, warmup_steps=0, seed=5),
    }
    configs = {}
    for i, (name, kw) in enumerate(shapes.items()):
        train_path, eval_path = write_data(tmp_path / f"data-{name}", n=24, seed=i)
        kw = {"warmup_steps": 2, **kw, **({"batch_size": batch_size} if batch_size else {})}
        if lr_of and name in lr_of:
            kw["lr"] = lr_of[name]
        configs[name] = TrainConfig(data=str(train_path), eval_data=str(eval_path),
                                    max_steps=STEPS, max_length=32, save_every=5,
                                    eval_every=STEPS, eval_examples=0,
                                    out=str(tmp_path / "fused" / name), **kw)
    return configs


def _solo(tmp_path, name, config):
    out = tmp_path / "solo" / name
    solo = TrainConfig(**{**config.to_dict(), "out": str(out)})
    train(solo, progress=False, model=tiny_llama(vocab=64), tokenizer=tiny_tokenizer(64))
    return out


def _centroid(out):
    return json.loads((out / "routing.json").read_text())["centroid"]


def _losses(out):
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def _close(a, b, rel=1e-5):
    return all(abs(x - y) <= rel * max(abs(x), abs(y), 1e-8) for x, y in zip(a, b, strict=True))


def _assert_same_adapter(a_dir, b_dir):
    a = read_safetensors(a_dir / "adapter_model.safetensors")
    b = read_safetensors(b_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    # relative error of the adapter's weights as one vector (Frobenius norms): per-row
    # results of the fused batch differ from the solo batch's in the last bits (other GEMM
    # shapes, the per-slot path), and 20 AdamW steps carry that rounding along
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a])
    ref = torch.cat([b[k].flatten() for k in a])
    err = float(torch.linalg.norm(diff) / torch.linalg.norm(ref))
    assert err <= 1e-5, err
    return err


@pytest.mark.parametrize(("batch_size", "rows_per_pass", "batched_path"),
                         [(None, 0, False), (None, 64, False), (3, 9, True)],
                         ids=["one-job-per-pass", "batches-differ", "batches-equal"])
def test_each_fused_job_equals_its_solo_run(tmp_path, monkeypatch, batch_size,
                                            rows_per_pass, batched_path):
    """By default a pass holds one job's rows (its slot alone). With wider passes, batches
    that differ run each job's rows through its slot by gathering them; equal batches run
    every slot's rows as a view in one batched matmul pair per layer (and a job whose rows
    are much shorter gets a pass of its own). All equal the solo runs."""
    from loratree.ops import slots as slot_ops

    batched = []
    real = slot_ops.grouped_branch
    monkeypatch.setattr(slot_ops, "grouped_branch",
                        lambda *a, **k: batched.append(1) or real(*a, **k))
    configs = _jobs(tmp_path, batch_size=batch_size)
    result = train_many(ManyConfig(tuple(configs), tuple(configs.values()), rows_per_pass),
                        progress=False, model=tiny_llama(vocab=64),
                        tokenizer=tiny_tokenizer(64))
    assert not result.errors and all(s == STEPS for s in result.steps.values())
    assert 0 < result.eval_seconds < result.seconds  # the jobs evaluated, timed apart
    for name, config in configs.items():
        solo = _solo(tmp_path, name, config)
        fused = tmp_path / "fused" / name
        assert _close(_losses(fused), _losses(solo)), name
        _assert_same_adapter(fused, solo)
        assert (fused / "loss.png").is_file()
        assert _centroid(fused) == pytest.approx(_centroid(solo), abs=1e-6)  # as train writes
    assert bool(batched) == batched_path  # which path the passes took


def test_a_job_with_nan_data_stops_alone(tmp_path):
    """all-r4's data holds a token whose embedding is NaN (bad data): its loss goes
    non-finite at step 1; the other jobs never see that token and train as if alone."""
    configs = _jobs(tmp_path)
    for name, c in configs.items():
        path = Path(c.data)
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        if name == "all-r4":
            rows = [{**r, "prompt": r["prompt"] + " w60"} for r in rows]
        else:  # the others never see the bad token
            rows = [{k: v.replace("w60", "w59") for k, v in r.items()} for r in rows]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tiny_llama(vocab=64)
    with torch.no_grad():
        model.get_input_embeddings().weight[60] = float("nan")  # the token "w60"
    result = train_many(ManyConfig(tuple(configs), tuple(configs.values())), progress=False,
                        model=model, tokenizer=tiny_tokenizer(64))
    assert set(result.errors) == {"all-r4"}
    assert "'all-r4'" in result.errors["all-r4"] and "step 1" in result.errors["all-r4"]
    assert result.steps["all-r4"] == 0
    for name in ("qv-r2", "mlp-r3"):
        assert result.steps[name] == STEPS
        solo = _solo(tmp_path, name, configs[name])
        _assert_same_adapter(tmp_path / "fused" / name, solo)


def test_killed_fused_run_resumes_to_the_same_losses(tmp_path):
    configs = _jobs(tmp_path)
    straight = train_many(ManyConfig(tuple(configs), tuple(configs.values())),
                          progress=False, model=tiny_llama(vocab=64),
                          tokenizer=tiny_tokenizer(64))
    moved = {n: TrainConfig(**{**c.to_dict(), "out": str(tmp_path / "broken" / n)})
             for n, c in configs.items()}
    many = ManyConfig(tuple(moved), tuple(moved.values()))
    run = setup_many(many, model=tiny_llama(vocab=64), tokenizer=tiny_tokenizer(64))

    def stop_at_7(step, _):
        if step == 7:
            run.stop_signal.append(15)  # as SIGTERM does

    first = fit_many(run, progress=False, on_step=stop_at_7)
    assert first.interrupted and all(s == 7 for s in first.steps.values())
    run = setup_many(many, model=tiny_llama(vocab=64), tokenizer=tiny_tokenizer(64))
    resumed = fit_many(run, resume=True, progress=False)
    for name in configs:
        assert len(resumed.losses[name]) == STEPS
        assert _close(resumed.losses[name], straight.losses[name]), name
        _assert_same_adapter(tmp_path / "broken" / name, tmp_path / "fused" / name)


def test_jobs_toml_and_bad_job_sets(tmp_path):
    path = tmp_path / "jobs.toml"
    path.write_text('[defaults]\nmax_steps = 3\nrank = 2\n\n[fused]\nrows_per_pass = 6\n\n'
                    '[[job]]\nname = "a"\ndata = "a.jsonl"\nout = "out/a"\n\n'
                    '[[job]]\nname = "b"\ndata = "b.jsonl"\nout = "out/b"\nrank = 4\n')
    many = ManyConfig.from_toml(path)
    assert many.names == ("a", "b") and [j.rank for j in many.jobs] == [2, 4]
    assert many.rows_per_pass == 6
    assert all(j.max_steps == 3 for j in many.jobs)
    path.write_text('[[job]]\nname = "a"\ndata = "a"\nbogus = 1\n')
    with pytest.raises(ValueError, match="bogus"):
        ManyConfig.from_toml(path)
    a = TrainConfig(data="a", out="o/a")
    with pytest.raises(ValueError, match="same out"):
        ManyConfig(("a", "b"), (a, a))
    with pytest.raises(ValueError, match="method"):
        ManyConfig(("a",), (TrainConfig(data="a", out="x", method="full"),))
    with pytest.raises(ValueError, match="same model"):
        ManyConfig(("a", "b"), (a, TrainConfig(data="b", out="o/b", model="other")))


def test_passes_keep_jobs_together_longest_first_and_split_on_padding_or_width():
    from loratree.models.chat import Example
    from loratree.train.passes import MAX_EXTRA_PADDING, passes

    def rows(*lengths):
        return [Example([1] * n, [1] * n) for n in lengths]

    long, also_long, short = object(), object(), object()
    parts = [(short, rows(10, 9)), (long, rows(40, 38)), (also_long, rows(40, 39))]
    cut = passes(parts)
    # short rows would pad the pass by 2 * 30 of 6 * 40 tokens: a pass of their own
    assert 2 * 30 > MAX_EXTRA_PADDING * 6 * 40
    assert [[job for job, _ in p] for p in cut] == [[long, long, also_long, also_long],
                                                    [short, short]]
    assert [[job for job, _ in p] for p in passes(parts, width=3)] == [
        [long, long], [also_long, also_long], [short, short]]
    assert [len(p) for p in passes([(long, rows(5, 5, 5, 5, 5))], width=2)] == [2, 2, 1]
    assert passes([(long, [])]) == []


def test_fused_evaluation_gives_each_job_its_slot_alone_answers(tmp_path):
    """Due jobs' greedy evaluations share batches, each row through its job's slot (two
    ``max_new_tokens`` here, so two groups); every job gets the answers, exact match and
    eval loss its slot gives alone."""
    from loratree import surgery
    from loratree.train.evaluate import generate
    from loratree.train.many import evaluate_jobs

    n = 6
    configs = {name: TrainConfig(**{**c.to_dict(), "max_steps": 6, "eval_examples": n,
                                    "max_new_tokens": 5 if name == "mlp-r3" else 7})
               for name, c in _jobs(tmp_path, lr_of={k: 5e-2 for k in
                                                     ("qv-r2", "all-r4", "mlp-r3")}).items()}
    run = setup_many(ManyConfig(tuple(configs), tuple(configs.values())),
                     model=tiny_llama(vocab=64), tokenizer=tiny_tokenizer(64))
    fit_many(run, progress=False)
    fused = {job.name: dict(job.evals) for job in run.jobs}  # the last step's, fused
    rows = [r for job in run.jobs for r in job.eval_rows.rows[:n]]
    mixed = generate(run.model, run.tokenizer, rows, max_new_tokens=7, batch_size=4 * n,
                     slots=[job.slot for job in run.jobs for _ in range(n)])
    differs = False
    for i, job in enumerate(run.jobs):
        alone = evaluate_jobs(run, [job])[job.name]
        assert set(alone) == {"eval_loss", "exact_match"} == set(fused[job.name])
        assert alone["exact_match"] == fused[job.name]["exact_match"]
        assert alone["eval_loss"] == pytest.approx(fused[job.name]["eval_loss"], rel=1e-6)
        with surgery.context(run.model).use(job.slot):
            solo = generate(run.model, run.tokenizer, job.eval_rows.rows[:n], max_new_tokens=7)
        assert mixed[n * i : n * (i + 1)] == solo
        other = run.jobs[(i + 1) % len(run.jobs)].slot
        with surgery.context(run.model).use(other):
            differs |= generate(run.model, run.tokenizer, job.eval_rows.rows[:n],
                                max_new_tokens=7) != solo
    assert differs  # the slots answer differently: the rows really ran through their own
