"""``loratree serve``'s flags for plain folders and vLLM's runtime lifecycle routes."""

import pytest

from loratree.cli.main import build_parser


def test_adapters_dirs_repeat_and_the_store_becomes_optional():
    args = build_parser().parse_args(["serve", "--adapters-dir", "a", "--adapters-dir", "b"])
    assert args.adapters_dir == ["a", "b"] and args.store is None
    assert build_parser().parse_args(["serve"]).adapters_dir == []


@pytest.mark.parametrize(("env", "on"), [(None, False), ("true", True), ("1", True),
                                         ("TRUE ", True), ("0", False), ("no", False)])
def test_runtime_updating_is_off_unless_asked_or_vllms_variable_says_so(monkeypatch, env, on):
    if env is None:
        monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    else:
        monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", env)
    parser = build_parser()
    assert parser.parse_args(["serve"]).allow_runtime_lora_updating is on
    assert parser.parse_args(["serve", "--allow-runtime-lora-updating"]
                             ).allow_runtime_lora_updating


@pytest.mark.parametrize(("argv", "store", "folders"), [
    (["--adapters-dir", "a", "--adapters-dir", "b"], None, ("a", "b")),
    (["--store", "s", "--adapters-dir", "a"], "s", ("a",)),
    ([], "adapters", ()),
])
def test_serve_on_ray_gets_the_same_store_and_folders(monkeypatch, argv, store, folders):
    import loratree.integrations.ray as ray_package

    got = []
    monkeypatch.setattr(ray_package, "require_ray", lambda: None)
    monkeypatch.setattr(ray_package, "serve_on_ray", lambda options, *rest: got.append(options))
    args = build_parser().parse_args(["serve", "--ray", "--replicas", "3", *argv])
    assert args.run(args) == 0
    assert (got[0].store, got[0].adapters_dirs, got[0].replicas) == (store, folders, 3)
