"""``python -m bench.gpu --out BENCHMARKS_GPU.md``: the rows this CPU cannot settle, again on
a CUDA device: fused training of 4 jobs against the same 4 one after another, and mixed-
adapter decoding against one adapter and against PEFT's mixed batch.

The device machines have no copy of SmolLM2's weights, so the model is a randomly
initialised Llama of SmolLM2-135M's exact shape (30 layers, hidden 576, 49,152 tokens):
speed depends on shapes, not on trained values. Quality rows stay in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bench.contenders import ALL_R16, QV_R8
from bench.harness import interleaved, machine_info
from bench.report import Check, Row, Table, render, write_atomic
from bench.serve_rows import NEW, _peft, generate_batch, make_store
from loratree.models.tiny import tiny_tokenizer
from loratree.serve import Engine
from loratree.serve.slot_table import BASE, SlotTable
from loratree.train import TrainConfig, fit, setup
from loratree.train.many import ManyConfig, fit_many, setup_many
from loratree.tree.cache import AdapterCache

log = logging.getLogger("bench.gpu")

SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                     num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     max_position_embeddings=2048, tie_word_embeddings=True,
                     rms_norm_eps=1e-5, rope_theta=100000.0)
JOBS, STEPS, WARM, BATCH = 4, 14, 4, 4


DEVICE = "cuda"
"""Where the rows run; ``--device cpu --layers 2`` is a quick local smoke run of the script."""


def smollm2_shaped(seed: int = 0, layers: int = 30) -> nn.Module:
    """A random-weight LlamaForCausalLM with SmolLM2-135M's configuration (fp32, eval)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    shape = {**SMOLLM2_SHAPE, "num_hidden_layers": layers}
    model = LlamaForCausalLM(LlamaConfig(**shape)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _rows(path: Path, seed: int, n: int = 64) -> Path:
    """JSONL of random word rows: 60-word prompts, 60-word completions (~128 tokens)."""
    rng = random.Random(seed)
    vocab = SMOLLM2_SHAPE["vocab_size"] - 3

    def words(k: int) -> str:
        return " ".join(f"w{rng.randrange(3, vocab)}" for _ in range(k))

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": words(60), "completion": words(60)}) + "\n"
                            for _ in range(n)))
    return path


def _configs(root: Path) -> tuple[tuple[str, ...], tuple[TrainConfig, ...]]:
    names = tuple(f"job{i}" for i in range(JOBS))
    configs = tuple(TrainConfig(
        data=str(_rows(root / n / "train.jsonl", i)), out=str(root / "runs" / n), rank=8,
        alpha=16.0, targets=("all-linear",), batch_size=BATCH, max_length=128,
        max_steps=STEPS, warmup_steps=0, lr=1e-3, seed=i, eval_every=STEPS,
        save_every=STEPS, device=DEVICE) for i, n in enumerate(names))
    return names, configs


def _step_times(stamps: list[float]) -> list[float]:
    """Durations of the steps after the warm-up ones, the last (it saves) left out."""
    return [b - a for a, b in zip(stamps[WARM - 1 : -2], stamps[WARM:-1], strict=True)]


def _clock(stamps: list[float]) -> Callable[..., None]:
    def on_step(*_: object) -> None:
        _sync()
        stamps.append(time.perf_counter())
    return on_step


def training(base: nn.Module, root: Path) -> tuple[Table, list[Check]]:
    """Median step time: 4 jobs fused (per pass: one job's rows, and all 16 rows) against
    the same jobs one after another in the single-adapter trainer."""
    tokenizer = tiny_tokenizer(SMOLLM2_SHAPE["vocab_size"])
    names, configs = _configs(root)
    solo = 0.0
    for c in configs:
        stamps: list[float] = []
        run = setup(c, model=copy.deepcopy(base), tokenizer=tokenizer)
        fit(run, progress=False, on_step=_clock(stamps))
        solo += statistics.median(_step_times(stamps))
        del run
    fused = {}
    for width in (0, BATCH * JOBS):
        stamps = []
        outs = tuple(TrainConfig(**{**c.to_dict(), "out": f"{c.out}-w{width}"})
                     for c in configs)
        run = setup_many(ManyConfig(names, outs, width), model=copy.deepcopy(base),
                         tokenizer=tokenizer)
        fit_many(run, progress=False, on_step=_clock(stamps))
        fused[width] = statistics.median(_step_times(stamps))
        del run
    table = Table(
        "CUDA: training 4 adapters at once, fused vs one after another",
        [Row("step of 4 jobs, fused, one pass per job's rows", fused[0], solo,
             "ms"),
         Row(f"step of 4 jobs, fused, one pass over all {BATCH * JOBS} rows",
             fused[BATCH * JOBS], solo, "ms")],
        [f"{JOBS} jobs, LoRA r=8 all-linear, batch {BATCH} x 128 tokens each, AdamW, fp32; "
         f"median step time over steps {WARM + 1}-{STEPS - 1} (the first {WARM} warm up, "
         "the last saves); 'alternative' = the sum of the 4 jobs' median solo step times "
         "(`train`, one after another)."],
        peer_name="one after another")
    best = min(fused.values()) / solo
    return table, [Check("CUDA: fused 4 jobs <= 0.9x the time of one after another",
                         f"{best:.2f}", best <= 0.9)]


def serving(base: nn.Module, root: Path, rounds: int) -> tuple[list[Table], list[Check]]:
    """Decode throughput, batch 8: one adapter, 8 different ones, none; PEFT mixed."""
    tables, checks = [], []
    tokenizer = tiny_tokenizer(SMOLLM2_SHAPE["vocab_size"])
    cuda = torch.device(DEVICE)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, SMOLLM2_SHAPE["vocab_size"] - 3, (8, 32), generator=g)
    prompts = [row.tolist() for row in ids]
    names = [f"a{i}" for i in range(8)]
    for spec in (QV_R8, ALL_R16):
        store = make_store(base, spec, root / spec.label.replace(" ", "_"))
        model = copy.deepcopy(base).to(cuda)
        table = SlotTable(model, AdapterCache(store, 2**30), n_slots=8, max_rank=16)
        engine = Engine(model, tokenizer, table, max_batch=8)
        theirs = _peft(base, store, names).to(cuda)
        fns = {"one": functools.partial(generate_batch, engine, prompts, [names[0]] * 8),
               "mixed": functools.partial(generate_batch, engine, prompts, names),
               "none": functools.partial(generate_batch, engine, prompts, [BASE] * 8),
               "PEFT mixed": _peft_mixed(theirs, ids.to(cuda), names)}
        t = interleaved(fns, rounds, warmup=2)
        tps = {k: 8 * NEW / v.median for k, v in t.items()}
        tables.append(Table(
            f"CUDA: serving throughput, 8 adapters {spec.label}",
            [Row("tokens/s, 8 different adapters vs all on one", tps["mixed"], tps["one"],
                 "count"),
             Row("tokens/s, 8 different adapters vs PEFT's mixed batch", tps["mixed"],
                 tps["PEFT mixed"], "count"),
             Row("tokens/s, no adapter vs all on one", tps["none"], tps["one"], "count")],
            [f"8 requests of 32 prompt tokens, {NEW} greedy new tokens each, submitted together; "
             "tokens/s = generated tokens / wall time (prefill included); medians of "
             f"{rounds} interleaved rounds. 'one' runs merged (the engine's policy)."],
            peer_name="alternative"))
        checks += [Check(f"CUDA {spec.label}: mixed >= 0.85x one adapter",
                         f"{tps['mixed'] / tps['one']:.2f}", tps["mixed"] >= 0.85 * tps["one"]),
                   Check(f"CUDA {spec.label}: mixed >= 1.3x PEFT mixed",
                         f"{tps['mixed'] / tps['PEFT mixed']:.2f}",
                         tps["mixed"] >= 1.3 * tps["PEFT mixed"])]
    return tables, checks


def _peft_mixed(model: nn.Module, ids: torch.Tensor, names: list[str]) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                           max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                           pad_token_id=0, adapter_names=names)
        _sync()
    return run


def _sync() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="BENCHMARKS_GPU.md")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=30)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    global DEVICE
    DEVICE = args.device
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench.gpu needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    t0 = time.perf_counter()
    base = smollm2_shaped(layers=args.layers)
    with tempfile.TemporaryDirectory(prefix="loratree-gpu-") as tmp:
        train_table, checks = training(base, Path(tmp) / "train")
        serve, serve_checks = serving(base, Path(tmp) / "serve", args.rounds)
    gpu = torch.cuda.get_device_name() if DEVICE.startswith("cuda") else "none (smoke run)"
    machine = {**machine_info(), "GPU": gpu}
    method = ["Model: a random-weight Llama of SmolLM2-135M-Instruct's shape, fp32 on the GPU "
              "(TF32 off); written by `python -m bench.gpu` on a lent device machine.",
              f"Whole run took {time.perf_counter() - t0:.0f} s."]
    write_atomic(args.out, render("loratree on CUDA", machine, method,
                                  [train_table, *serve], checks + serve_checks))
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
