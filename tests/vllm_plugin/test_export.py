"""``loratree export --for vllm``: one flat directory of plain PEFT LoRA adapters (tree
nodes composed), prefix adapters skipped with a warning, and the arguments vLLM needs."""

import json

import peft
import pytest
import torch

from loratree.adapters.files import read_adapter
from loratree.cli.main import main
from loratree.models.tiny import tiny_tokenizer
from loratree.tree import Tree
from loratree.vllm_plugin import export_store
from loratree.vllm_plugin.export import ARGS_NAME, EXPORT_MANIFEST
from tests.serve.common import VOCAB, tiny_model
from tests.vllm_plugin.common import LORAS, build_store


@pytest.fixture
def store(tmp_path):
    return build_store(tmp_path)


def test_every_lora_is_exported_flat_and_the_prefix_is_skipped(store, tmp_path, caplog):
    report = export_store(store, tmp_path / "out", base_model="/models/base")
    out = tmp_path / "out"
    flat = {n.replace("/", "--") for n in LORAS}
    assert set(report.names) == flat
    assert {p.name for p in out.iterdir() if p.is_dir()} == flat  # one level deep
    assert list(report.skipped) == ["pre"] and "loratree serve" in report.skipped["pre"]
    assert "skipped 'pre'" in caplog.text
    tree = Tree(store)
    for name in LORAS:
        written = read_adapter(out / name.replace("/", "--"))
        assert written.base_model == "/models/base"
        for m, (a, b) in tree.composed(name).weights.items():
            assert torch.equal(written.weights[m][0], a) and torch.equal(written.weights[m][1], b)
    manifest = json.loads((out / EXPORT_MANIFEST).read_text())
    assert manifest["max_lora_rank"] == 8 and report.max_rank == 6
    assert manifest["adapters"]["sup--fr--acme"]["store_name"] == "sup/fr/acme"
    args = (out / ARGS_NAME).read_text().split()
    assert args[:5] == ["--enable-lora", "--max-lora-rank", "8", "--lora-modules",
                        f"mlp={out / 'mlp'}"]
    assert len(args) == 4 + len(LORAS)


def test_an_exported_node_gives_peft_the_same_logits_as_loratree(store, tmp_path):
    export_store(store, tmp_path / "out")
    ids = torch.tensor([tiny_tokenizer(VOCAB)("a b c d e").input_ids])
    base = tiny_model()
    ref = peft.PeftModel.from_pretrained(base, str(tmp_path / "out" / "sup--fr--acme"))
    from loratree.adapters import load_adapter

    ours = tiny_model()
    load_adapter(ours, Tree(store).export("sup/fr/acme", tmp_path / "tree-export"))
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=ids).logits, ours(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_a_second_export_replaces_the_first_and_other_directories_are_never_overwritten(
        store, tmp_path):
    export_store(store, tmp_path / "out")
    store.remove("mlp")
    assert "mlp" not in export_store(store, tmp_path / "out").names
    assert not (tmp_path / "out" / "mlp").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a loratree export"):
        export_store(store, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_names_that_flatten_alike_are_refused(store, tmp_path):
    store.add("sup--fr", store.path_of("qv"))
    with pytest.raises(ValueError, match="'sup--fr' and 'sup/fr' both export"):
        export_store(store, tmp_path / "out")


def test_the_cli_exports_and_prints_the_vllm_command(store, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", "--for", "vllm", str(store.root), str(out)]) == 0
    text = capsys.readouterr().out
    assert "exported 5 adapter(s)" in text and "--max-lora-rank 8" in text
    assert "skipped pre: adapter 'pre' is a prefix adapter" in text
    assert f"VLLM_LORA_RESOLVER_CACHE_DIR={out}" in text
    with pytest.raises(SystemExit):  # argparse names the choices
        main(["export", "--for", "sglang", str(store.root), str(out)])
