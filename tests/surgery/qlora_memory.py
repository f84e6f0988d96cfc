"""Peak resident memory of quantizing a model and of one QLoRA step, in a fresh process.

python -m tests.surgery.qlora_memory  -> one JSON line of byte counts.

Linux only: /proc/self/clear_refs resets the peak (VmHWM) so each phase is measured alone.
Run with MALLOC_MMAP_THRESHOLD_ low, so freed tensors go back to the OS at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loratree import surgery
from loratree.config import LoraConfig


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    warm = torch.nn.Linear(64, 64)  # load the kernels (their code pages count as RSS)
    warm(torch.randn(2, 64, requires_grad=True)).sum().backward()
    torch.optim.AdamW(warm.parameters()).step()
    baseline = _status("VmRSS")

    cfg = LlamaConfig(vocab_size=1000, hidden_size=1024, intermediate_size=2816,
                      num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).float()
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    layer_bytes = max(m.weight.numel() * 4 for m in model.modules()
                      if isinstance(m, torch.nn.Linear))
    before_quantize = _status("VmRSS")
    _reset_peak()
    surgery.quantize(model)
    quantize_peak = _status("VmHWM")

    surgery.inject(model, LoraConfig(rank=8, alpha=16.0, targets=("q_proj", "v_proj")))
    model.train()
    opt = torch.optim.AdamW(surgery.adapter_parameters(model, 0), lr=1e-3)
    ids = torch.randint(0, 1000, (2, 32))
    _reset_peak()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    step_peak = _status("VmHWM")
    print(json.dumps({
        "float_bytes": float_bytes,
        "layer_bytes": layer_bytes,
        "quantize_peak_over_float_model": quantize_peak - before_quantize,
        "step_peak_over_baseline": step_peak - baseline,
        "loss": loss.item(),
    }))


if __name__ == "__main__":
    main()
