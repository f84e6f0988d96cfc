"""QLoRA rows: NF4 storage, resident memory, forward and step time against two peers.

Three models carry the same LoRA weights (q,v r=8, copied by name): ours on the float
base, ours on our NF4 base, and PEFT on a base whose same linear layers are bitsandbytes
``Linear4bit`` (nf4, block 64, double quantization, fp32 compute), the reference QLoRA
path. They are timed interleaved in one process, as every other row.

Resident memory is measured in fresh processes (``bench.rss``): the growth of RSS from
loading each saved form of the model, so allocator slack and import costs stay out.
"""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from bench.contenders import PEFT_PREFIX, QV_R8, add_ours_slot, ours_model, peft_model, random_ids
from bench.harness import forward_fn, interleaved
from bench.report import Check, Row, Table, fmt
from bench.train_rows import BATCH, SEQ, _batch, _memory, _step
from loratree import surgery
from loratree.models import load_base, save_model
from loratree.surgery.inject import replace_module
from loratree.train.steps import loss_sum

__all__ = ["BYTES_PER_PARAM_TARGET", "STEP_RATIO_TARGET", "qlora_tables"]

log = logging.getLogger(__name__)

BYTES_PER_PARAM_TARGET = 0.52
STEP_RATIO_TARGET = 1.25


def qlora_tables(base: nn.Module, repeats: int, tmp: Path) -> tuple[list[Table], list[Check]]:
    """Storage, resident memory, forward and train-step rows for QLoRA."""
    quantized = copy.deepcopy(base)
    report = surgery.quantize(quantized)
    ours_bpp = report.quant_bytes / report.params
    resident = _resident_rows(base, quantized, tmp)
    on_float = ours_model(base, QV_R8, seed=40)
    on_nf4 = quantized
    add_ours_slot(on_nf4, QV_R8, seed=40)
    for m in (on_float, on_nf4):
        surgery.set_trainable(m, 0)
    models: dict[str, nn.Module] = {"float LoRA": on_float, "ours QLoRA": on_nf4}
    bnb_bpp = None
    bnb = _bnb_model(base, report.layers)
    if bnb is not None:
        bnb_bpp = _bnb_bytes(bnb) / report.params
        # no deep copy: copying a Linear4bit loses its quantization state on CPU
        models["bnb QLoRA"] = peft_model(bnb, QV_R8, on_float, copy_base=False)
        _check_same_gradients(models["ours QLoRA"], models["bnb QLoRA"], _batch(base))

    ids = random_ids(base, BATCH, SEQ, seed=6)
    log.info("QLoRA forward: %d contenders x %d rounds", len(models), repeats)
    fwd = interleaved({k: forward_fn(m, ids) for k, m in models.items()}, repeats, warmup=1)
    batch = _batch(base)
    log.info("QLoRA train steps: %d contenders x %d rounds", len(models), repeats)
    steps = interleaved({k: _step(m, batch) for k, m in models.items()}, repeats, warmup=1)
    memory = {k: _memory(m, batch) for k, m in models.items()}
    have_bnb = bnb is not None
    del models, on_float, on_nf4, quantized, bnb

    def med(name: str) -> float:
        return steps[name].median

    tables = [
        Table(
            f"QLoRA vs LoRA on the float base, q,v r=8 (batch {BATCH} x {SEQ})",
            [
                Row("forward (inference)", fwd["ours QLoRA"].median, fwd["float LoRA"].median,
                    "ms"),
                Row("train step", med("ours QLoRA"), med("float LoRA"), "ms"),
                Row("training memory", memory["ours QLoRA"], memory["float LoRA"], "bytes"),
            ],
            [
                f"Both ours; the NF4 base has {len(report.layers)} linear layers quantized "
                f"({report.params:,} parameters, block 64, double quantization); embeddings "
                "and the tied output head stay float32.",
                "Training memory as in the training tables: bytes autograd saves plus "
                "gradients, optimizer state and trainable parameters (frozen weights apart).",
            ],
            peer_name="float LoRA",
        ),
    ]
    rows = [Row("bytes per quantized parameter", ours_bpp, bnb_bpp, "ratio")]
    if have_bnb:
        rows += [
            Row("forward (inference)", fwd["ours QLoRA"].median, fwd["bnb QLoRA"].median, "ms"),
            Row("train step", med("ours QLoRA"), med("bnb QLoRA"), "ms"),
            Row("training memory", memory["ours QLoRA"], memory["bnb QLoRA"], "bytes"),
        ]
    tables.append(Table(
        f"QLoRA: ours vs bitsandbytes' 4-bit path, q,v r=8 (batch {BATCH} x {SEQ})",
        rows,
        ["bitsandbytes: `Linear4bit` (nf4, block 64, compress_statistics, fp32 compute) on "
         "the same layers, LoRA by PEFT; bytes counted from each layer's state dict "
         "(packed codes, constants, code tables)." if have_bnb else
         "bitsandbytes is not installed here: its column is empty."],
        peer_name="bitsandbytes",
    ))
    tables.append(resident)

    checks = [
        Check(f"NF4 linear weights <= {BYTES_PER_PARAM_TARGET} bytes per parameter",
              f"{ours_bpp:.4f}", ours_bpp <= BYTES_PER_PARAM_TARGET),
        Check(f"QLoRA step / float-LoRA step <= {STEP_RATIO_TARGET}",
              f"{med('ours QLoRA') / med('float LoRA'):.3f}",
              med("ours QLoRA") <= STEP_RATIO_TARGET * med("float LoRA")),
    ]
    if "bnb QLoRA" in steps:
        checks.append(Check(
            f"QLoRA step / bitsandbytes QLoRA step <= {STEP_RATIO_TARGET}",
            f"{med('ours QLoRA') / med('bnb QLoRA'):.3f}",
            med("ours QLoRA") <= STEP_RATIO_TARGET * med("bnb QLoRA")))
    return tables, checks


def _check_same_gradients(ours: nn.Module, theirs: nn.Module, batch: dict) -> None:
    """Both QLoRA models hold the same NF4 codes and LoRA weights, so one step's LoRA
    gradients must agree; otherwise timing them side by side would compare different work.
    """
    for model in (ours, theirs):
        model.train()
        model.zero_grad(set_to_none=True)
        loss_sum(model, batch, "fp32").backward()
    mine = {n: (m.lora_a[0].grad, m.lora_b[0].grad)
            for n, m in surgery.lora_layers(ours).items() if m.specs[0].rank > 0}
    peer = {n.removeprefix(PEFT_PREFIX): (m.lora_A["default"].weight.grad,
                                          m.lora_B["default"].weight.grad)
            for n, m in theirs.named_modules() if isinstance(getattr(m, "lora_A", None),
                                                             nn.ModuleDict)}
    if set(mine) != set(peer):
        raise RuntimeError("bitsandbytes and ours adapt different layers")
    for n, grads in mine.items():
        for g, h in zip(grads, peer[n], strict=True):
            if g is None or h is None or not torch.allclose(g, h, rtol=1e-3,
                                                            atol=1e-4 * g.abs().max().item()):
                raise RuntimeError(f"{n}: bitsandbytes' QLoRA gradient differs from ours")
    for model in (ours, theirs):
        model.zero_grad(set_to_none=True)
    log.info("bitsandbytes and ours agree on one step's LoRA gradients (rtol 1e-3)")


def _bnb_model(base: nn.Module, layers: tuple[str, ...]) -> nn.Module | None:
    """A copy of ``base`` with ``layers`` as bitsandbytes Linear4bit; None without bnb."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        log.warning("bitsandbytes is not installed: no bitsandbytes rows")
        return None
    model = copy.deepcopy(base)
    for name in layers:
        linear = model.get_submodule(name)
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4",
        )
        layer.weight = bnb.nn.Params4bit(
            linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
            compress_statistics=True, blocksize=64,
        )
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        replace_module(model, name, layer.to(linear.weight.device))  # .to quantizes
    return model


def _bnb_bytes(model: nn.Module) -> int:
    import bitsandbytes as bnb

    total = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            total += sum(t.numel() * t.element_size() for k, t in m.state_dict().items()
                         if k != "bias")
    return total


def _resident_rows(base: nn.Module, quantized: nn.Module, tmp: Path) -> Table:
    """Tensor bytes and RSS growth of SmolLM2 loaded as fp32, bf16, NF4 (fp32 / bf16 rest)."""
    _, tokenizer = load_base(None)
    fp32_dir = save_model(base, tokenizer, tmp / "fp32")
    nf4_dir = save_model(quantized, tokenizer, tmp / "nf4")
    forms = {
        "float32": (fp32_dir, "float32"),
        "bfloat16": (fp32_dir, "bfloat16"),
        "NF4 linears, float32 rest": (nf4_dir, "float32"),
        "NF4 linears, bfloat16 rest": (nf4_dir, "bfloat16"),
    }
    measured = {name: _rss(path, dtype) for name, (path, dtype) in forms.items()}
    ref = measured["float32"]
    rows = []
    for name, m in measured.items():
        rows.append(Row(f"tensors, {name}", m["tensor_bytes"], ref["tensor_bytes"], "bytes"))
        rows.append(Row(f"RSS growth on load, {name}", m["rss_growth"], ref["rss_growth"],
                        "bytes"))
    peaks = ", ".join(f"{name} {fmt(m['peak_growth'], 'bytes')}" for name, m in measured.items())
    return Table(
        "Resident memory of SmolLM2-135M",
        rows,
        [
            "Each form loaded by `loratree.models.load_base` from a saved directory in a "
            "fresh process (`python -m bench.rss`); RSS growth = RSS after load minus RSS "
            "after imports. Tensors = unique storages of parameters and buffers.",
            f"Peak RSS growth while loading: {peaks}.",
        ],
        peer_name="float32",
    )


def _rss(path: Path, dtype: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.rss", str(path), dtype],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])
