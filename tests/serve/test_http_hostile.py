"""Hostile adapter files and fuzzed requests against a live server: each bad adapter gets
a 4xx (never a 5xx) while a good adapter is served without a single error, and fuzzed
bodies never produce a 5xx."""

import json
import os
import shutil
import struct
import threading
import uuid

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from safetensors.torch import load_file, save_file
from schemathesis import GenerationMode

from loratree.adapters import AdapterStore
from loratree.errors import AdapterFileError, NonFiniteError
from loratree.models.tiny import tiny_tokenizer
from tests.serve.common import VOCAB, solo_reference
from tests.serve.conftest import live, make_engine

W = "adapter_model.safetensors"
C = "adapter_config.json"
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
PROMPT = [5, 9, 13, 3, 40]


def _tensors(d, edit):
    t = load_file(str(d / W))
    edit(t)
    save_file(t, str(d / W))


def _config(d, edit):
    cfg = json.loads((d / C).read_text())
    edit(cfg)
    (d / C).write_text(json.dumps(cfg))


def _bytes(d, edit):
    (d / W).write_bytes(edit((d / W).read_bytes()))


def _header(d, edit):
    """Rewrite the safetensors header JSON, keeping the data bytes."""
    raw = (d / W).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    (d / W).write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def _first(h):
    return next(k for k in h if k != "__metadata__")


def _set(key, value):
    return lambda c: c.__setitem__(key, value)


def _drop(key):
    return lambda c: c.pop(key)


def _pickle(d):
    import io
    import zipfile

    buf = io.BytesIO()  # what torch.save writes: a zip holding a pickle; never loaded
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85R.")
    (d / W).write_bytes(buf.getvalue())


def _symlink(d, name, target):
    (d / name).unlink()
    os.symlink(target, d / name)


CASES = {
    "truncated": lambda d: _bytes(d, lambda b: b[:-100]),
    "truncated to 4 bytes": lambda d: _bytes(d, lambda b: b[:4]),
    "empty weights": lambda d: _bytes(d, lambda b: b""),
    "header longer than the file": lambda d: _bytes(
        d, lambda b: struct.pack("<Q", len(b) * 10) + b[8:]),
    "header length 2**63": lambda d: _bytes(d, lambda b: struct.pack("<Q", 2**63) + b[8:]),
    "header not JSON": lambda d: _bytes(d, lambda b: struct.pack("<Q", 5) + b"{{{{{" + b[13:]),
    "header a JSON list": lambda d: _bytes(d, lambda b: struct.pack("<Q", 2) + b"[]"),
    "header not UTF-8": lambda d: _bytes(d, lambda b: struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc"),
    "overlapping offsets": lambda d: _header(d, lambda h: [
        v.__setitem__("data_offsets", h[_first(h)]["data_offsets"])
        for k, v in h.items() if k != "__metadata__"]),
    "offsets past the data": lambda d: _header(d, lambda h: h[_first(h)].__setitem__(
        "data_offsets", [0, 10**9])),
    "offsets reversed": lambda d: _header(d, lambda h: h[_first(h)].__setitem__(
        "data_offsets", h[_first(h)]["data_offsets"][::-1])),
    "offsets as strings": lambda d: _header(d, lambda h: h[_first(h)].__setitem__(
        "data_offsets", ["0", "8"])),
    "no data_offsets": lambda d: _header(d, lambda h: h[_first(h)].pop("data_offsets")),
    "shape disagrees with the bytes": lambda d: _header(d, lambda h: h[_first(h)].__setitem__(
        "shape", [3, 3])),
    "negative dimension": lambda d: _header(d, lambda h: h[_first(h)].__setitem__(
        "shape", [-1, 32])),
    "unknown dtype": lambda d: _header(d, lambda h: h[_first(h)].__setitem__("dtype", "Q7")),
    "trailing bytes": lambda d: _bytes(d, lambda b: b + b"\x00" * 64),
    "metadata not strings": lambda d: _header(d, lambda h: h.__setitem__(
        "__metadata__", {"format": [1, 2]})),
    "NaN weights": lambda d: _tensors(d, lambda t: t[f"{Q0}.lora_A.weight"].__setitem__(
        (0, 0), float("nan"))),
    "Inf weights": lambda d: _tensors(d, lambda t: t[f"{Q0}.lora_B.weight"].__setitem__(
        (0, 0), float("inf"))),
    "integer weights": lambda d: _tensors(d, lambda t: t.__setitem__(
        f"{Q0}.lora_A.weight", t[f"{Q0}.lora_A.weight"].to(torch.int32))),
    "wrong shape B": lambda d: _tensors(d, lambda t: t.__setitem__(
        f"{Q0}.lora_B.weight", torch.zeros(31, 2))),
    "wrong shape A": lambda d: _tensors(d, lambda t: t.__setitem__(
        f"{Q0}.lora_A.weight", torch.zeros(2, 7))),
    "A and B ranks differ": lambda d: _tensors(d, lambda t: t.__setitem__(
        f"{Q0}.lora_B.weight", torch.zeros(32, 3))),
    "3-D weight": lambda d: _tensors(d, lambda t: t.__setitem__(
        f"{Q0}.lora_A.weight", torch.zeros(2, 32, 1))),
    "B missing": lambda d: _tensors(d, lambda t: t.pop(f"{Q0}.lora_B.weight")),
    "module missing": lambda d: _tensors(d, lambda t: (t.pop(f"{Q0}.lora_A.weight"),
                                                       t.pop(f"{Q0}.lora_B.weight"))),
    "unexpected tensor": lambda d: _tensors(d, lambda t: t.__setitem__(
        "base_model.model.nope.lora_A.weight", torch.zeros(2, 4))),
    "no tensors at all": lambda d: save_file({}, str(d / W)),
    "rank 0": lambda d: (_config(d, _set("r", 0)), _tensors(d, lambda t: [
        t.__setitem__(k, v[:0] if ".lora_A." in k else v[:, :0]) for k, v in list(t.items())])),
    "rank above the slots' maximum": lambda d: (_config(d, _set("r", 16)), _tensors(
        d, lambda t: [t.__setitem__(k, torch.zeros(16, v.shape[1]) if ".lora_A." in k
                                    else torch.zeros(v.shape[0], 16))
                      for k, v in list(t.items())])),
    "pickle disguised as safetensors": _pickle,
    "only a pickle file": lambda d: (d / W).rename(d / "adapter_model.bin"),
    "weights missing": lambda d: (d / W).unlink(),
    "weights a directory": lambda d: ((d / W).unlink(), (d / W).mkdir()),
    "weights a symlink outside": lambda d: _symlink(d, W, "/etc/passwd"),
    "config a symlink outside": lambda d: _symlink(d, C, "/etc/hostname"),
    "config not JSON": lambda d: (d / C).write_text("{not json"),
    "config empty": lambda d: (d / C).write_text(""),
    "config a JSON list": lambda d: (d / C).write_text("[1, 2]"),
    "config missing": lambda d: (d / C).unlink(),
    "config a directory": lambda d: ((d / C).unlink(), (d / C).mkdir()),
    "config over a megabyte": lambda d: (d / C).write_text(
        json.dumps({"pad": "x" * (2 << 20)})),
    "config without r": lambda d: _config(d, _drop("r")),
    "config without target_modules": lambda d: _config(d, _drop("target_modules")),
    "config r as a string": lambda d: _config(d, _set("r", "2")),
    "config r negative": lambda d: _config(d, _set("r", -2)),
    "config alpha a string": lambda d: _config(d, _set("lora_alpha", "lots")),
    "config alpha NaN": lambda d: (d / C).write_text(
        (d / C).read_text().replace('"lora_alpha": 4', '"lora_alpha": NaN')),
    "config peft_type unknown": lambda d: _config(d, _set("peft_type", "IA3")),
    "config target_modules a number": lambda d: _config(d, _set("target_modules", 7)),
    "config DoRA": lambda d: _config(d, _set("use_dora", True)),
    "prefix of the wrong width": "prefix-wrong-width",
    "prefix with more vectors than declared": "prefix-wrong-count",
}


def _prefix_case(d, kind):
    if kind == "prefix-wrong-width":
        _tensors(d, lambda t: t.__setitem__("prompt_embeddings", torch.zeros(3, 7)))
    else:
        _config(d, _set("num_virtual_tokens", 5))


def _plant(store, name, source):
    """Put ``source``'s files in the store as ``name`` the way a careless copy would, past
    ``AdapterStore.add``'s checks (it refuses most of these files up front)."""
    version = store.objects / uuid.uuid4().hex
    version.mkdir()
    for entry in source.iterdir():
        if entry.is_symlink():
            os.symlink(os.readlink(entry), version / entry.name)
        elif entry.is_dir():
            (version / entry.name).mkdir()
        else:
            shutil.copyfile(entry, version / entry.name)
    os.symlink(os.path.relpath(version, store.root), store.root / name)


def test_hostile_adapter_files_get_4xx_while_a_good_adapter_serves_on(many, tmp_path):
    assert len(CASES) >= 40
    store = AdapterStore(tmp_path / "store")
    store.add("good", many.path_of("a01"))
    tok = tiny_tokenizer(VOCAB)
    good_text = tok.decode(solo_reference(store, "good", PROMPT, 6)[0], skip_special_tokens=True)
    engine = make_engine(store, cache_adapters=4, slots=4)
    refused_by_add, statuses, good_errors = 0, {}, []
    current = ["(none yet)"]
    stop = threading.Event()
    with live(store, engine) as (url, _):
        def serve_good():
            with httpx.Client(base_url=url, timeout=60) as http:
                while not stop.is_set():
                    r = http.post("/v1/completions", json={"model": "good", "prompt": PROMPT,
                                                           "max_tokens": 6, "temperature": 0})
                    if r.status_code != 200 or r.json()["choices"][0]["text"] != good_text:
                        good_errors.append(f"during {current[0]!r}: {r.text[:200]}")

        worker = threading.Thread(target=serve_good)
        worker.start()
        try:
            with httpx.Client(base_url=url, timeout=60) as http:
                for i, (label, corrupt) in enumerate(CASES.items()):
                    current[0] = label
                    src = tmp_path / f"case{i}"
                    is_prefix = isinstance(corrupt, str)
                    shutil.copytree(many.path_of("prefix" if is_prefix else "a01"), src)
                    _prefix_case(src, corrupt) if is_prefix else corrupt(src)
                    try:
                        store.add(f"bad{i}", src)
                    except (AdapterFileError, NonFiniteError):
                        refused_by_add += 1
                        _plant(store, f"bad{i}", src)
                    r = http.post("/v1/completions", json={"model": f"bad{i}", "prompt": PROMPT,
                                                           "max_tokens": 4})
                    statuses[label] = r.status_code
                    assert "Traceback" not in r.text and str(tmp_path) not in r.text, label
        finally:
            stop.set()
            worker.join()
        assert http_health(url) == 200
    wrong = {k: v for k, v in statuses.items() if not 400 <= v < 500}
    assert not wrong, wrong
    assert not good_errors, good_errors[:3]
    assert refused_by_add >= 30  # most never even enter the store through add()


def http_health(url):
    return httpx.get(f"{url}/health").status_code


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                         ids=["valid", "invalid"])
def test_fuzzed_requests_never_get_a_5xx(many, mode):
    engine = make_engine(many)
    with live(many, engine) as (url, state):
        schema = schemathesis.openapi.from_dict(httpx.get(f"{url}/openapi.json").json())
        checked, statuses = {}, {}
        for result in schema.get_all_operations():
            operation = result.ok()
            if mode == GenerationMode.NEGATIVE and operation.method.upper() == "GET":
                continue  # no parameters: there is no invalid input to make

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=100, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def fuzz(case):
                if isinstance(case.body, dict):
                    # keep generations short: the point is the input handling
                    for key in ("max_tokens", "max_completion_tokens"):
                        if isinstance(case.body.get(key), int) and case.body[key] > 8:
                            case.body[key] = 8
                    # and name a real adapter half the time, so fuzzed sampling settings
                    # reach the engine instead of stopping at 404
                    if isinstance(case.body.get("model"), str) and len(repr(case.body)) % 2:
                        case.body["model"] = "a03"
                response = case.call(base_url=url, timeout=60)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                assert response.status_code < 500, (case.method, case.path, case.body,
                                                    response.text[:300])
                label = case.operation.label
                checked[label] = checked.get(label, 0) + 1

            fuzz()
        assert state.in_flight == 0
    # operations that take a body (completions, chat, embeddings) get >= 100 distinct cases
    # each; the bodiless GETs (health, ready, metrics, models) have nothing to vary and run
    # once per mode
    with_body = {k: n for k, n in checked.items() if k.startswith("POST")}
    assert len(with_body) == 3 and (mode == GenerationMode.NEGATIVE or len(checked) >= 6), checked
    assert all(n >= 100 for n in with_body.values()), checked
    if mode == GenerationMode.POSITIVE:
        assert statuses.get(200, 0) >= 20, statuses  # fuzzed settings did reach the engine
