"""What the structured-output tests share: a 64-token byte-level tokenizer in which JSON is
expressible (the word-level ``tiny_tokenizer`` cannot spell ``{``, and llguidance cannot
read it), a validator for the JSON-schema features the tests use (``jsonschema`` is not a
dependency), the schemas, and an engine that speaks JSON."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from loratree.serve import Engine
from loratree.serve.slot_table import SlotTable
from loratree.tree.cache import AdapterCache
from tests.serve.common import VOCAB, tiny_model

SPECIALS = ("<unk>", "<s>", "</s>")
EOS = 2
# GPT-2's byte-level alphabet spells the printable ASCII bytes as themselves and a space as
# "Ġ"; every letter a schema's keys may need, and a few multi-byte tokens (closing quotes,
# literals) that keep sampled strings short
PIECES = (*'{}[]":,-.0123456789', "Ġ", *"abcdefghijklmnopqrstuvwxyzE\\",
          '"}', '",', '":', '"]', "true", "false", "null", '{"', "},", "],", "}]", "]}", "{}")


def json_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of exactly ``VOCAB`` tokens (no merges: text encodes
    character by character, unknown bytes to ``<unk>``); ``</s>`` ends a sequence."""
    vocab = {name: i for i, name in enumerate(SPECIALS)}
    for piece in PIECES:
        vocab.setdefault(piece, len(vocab))
    assert len(vocab) == VOCAB, len(vocab)
    backend = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", pad_token="</s>")


def json_engine(store, max_batch=8) -> Engine:
    """An engine over ``tiny_model`` with ``json_tokenizer`` and room for JSON."""
    model = tiny_model()
    model.config.max_position_embeddings = 512  # RoPE has no table to outgrow
    size = max(i.size for i in store.list())
    table = SlotTable(model, AdapterCache(store, 6 * size), n_slots=4, max_rank=8)
    return Engine(model, json_tokenizer(), table, max_batch=max_batch, cpu_tuning=None)


POINT = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "kind": {"enum": ["dot", "line", "box"]},
        "at": {"type": "object",
               "properties": {"x": {"type": "number"},
                              "y": {"type": "integer", "minimum": 0, "maximum": 99}},
               "required": ["x", "y"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3},
                 "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "kind", "at", "tags"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 9999},
        "lines": {"type": "array", "minItems": 1, "maxItems": 2,
                  "items": {"$ref": "#/$defs/line"}},
        "note": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}]},
    },
    "required": ["id", "lines", "note"],
    "additionalProperties": False,
    "$defs": {"line": {"type": "object",
                       "properties": {"sku": {"enum": ["a1", "b2"]},
                                      "qty": {"type": "integer", "minimum": 1,
                                              "maximum": 20},
                                      "price": {"type": "number", "minimum": 0}},
                       "required": ["sku", "qty", "price"],
                       "additionalProperties": False}},
}


def violations(value: object, schema: dict, root: dict | None = None,
               at: str = "$") -> list[str]:
    """Where ``value`` breaks ``schema``: the features the tests' schemas use (type, enum,
    properties, required, additionalProperties, items, min/maxItems, maxLength,
    minimum/maximum, anyOf, local ``$ref``); [] when it is valid."""
    root = schema if root is None else root
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return violations(value, target, root, at)
    if "anyOf" in schema:
        if all(violations(value, s, root, at) for s in schema["anyOf"]):
            return [f"{at}: matches none of anyOf"]
        return []
    if "enum" in schema:
        return [] if value in schema["enum"] else [f"{at}: {value!r} not in enum"]
    kind = schema.get("type")
    if kind is not None and not _is(value, kind):
        return [f"{at}: {value!r} is not {kind}"]
    return _object(value, schema, root, at) + _other(value, schema, root, at)


def _object(value: object, schema: dict, root: dict, at: str) -> list[str]:
    if not isinstance(value, dict):
        return []
    props = schema.get("properties", {})
    problems = [f"{at}: missing {k}" for k in schema.get("required", ()) if k not in value]
    if schema.get("additionalProperties", True) is False:
        problems += [f"{at}: extra {k}" for k in value if k not in props]
    for k, v in value.items():
        if k in props:
            problems += violations(v, props[k], root, f"{at}.{k}")
    return problems


def _other(value: object, schema: dict, root: dict, at: str) -> list[str]:
    problems = []
    if isinstance(value, list):
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 1 << 30):
            problems.append(f"{at}: {len(value)} items")
        for i, v in enumerate(value):
            problems += violations(v, schema.get("items", {}), root, f"{at}[{i}]")
    if isinstance(value, str) and len(value) > schema.get("maxLength", 1 << 30):
        problems.append(f"{at}: longer than {schema['maxLength']}")
    if _is(value, "number") and not (schema.get("minimum", -float("inf")) <= value
                                     <= schema.get("maximum", float("inf"))):
        problems.append(f"{at}: {value} out of range")
    return problems

def _is(value: object, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    types = {"object": dict, "array": list, "string": str, "boolean": bool,
             "null": type(None)}
    return isinstance(value, types[kind])
