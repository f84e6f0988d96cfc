"""Structured outputs in the engine (Python API): formats, grammars, and constrained rows
beside free ones in one batch."""

import json

import pytest

from loratree.errors import ResponseFormatError
from loratree.models.tiny import tiny_tokenizer
from loratree.serve import FinishReason, Request
from loratree.serve.constrain import Grammars, JsonFormat, JsonMode
from loratree.serve.slot_table import BASE
from tests.serve.common import VOCAB
from tests.serve.json_vocab import EOS, ORDER, POINT, json_engine, json_tokenizer, violations


@pytest.fixture(scope="module")
def grammars():
    return Grammars(json_tokenizer(), VOCAB, {EOS}, capacity=2)


def test_format_checks_its_schema():
    assert JsonFormat().key == '{"type":"object"}'
    fmt = JsonFormat.of_schema({"type": "object", "properties": {"b": {}, "a": {}}})
    assert fmt.mode is JsonMode.SCHEMA and fmt.key.index('"b"') < fmt.key.index('"a"')
    with pytest.raises(ResponseFormatError, match="object or a boolean"):
        JsonFormat(JsonMode.SCHEMA, "[1, 2]")
    with pytest.raises(ResponseFormatError, match="not JSON"):
        JsonFormat(JsonMode.SCHEMA, "{type: object}")
    with pytest.raises(ResponseFormatError, match="takes no schema"):
        JsonFormat(JsonMode.OBJECT, "{}")
    with pytest.raises(ResponseFormatError, match="JsonMode"):
        JsonFormat("json_object")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ignore_eos"):
        Request("x", constraint=JsonFormat(), ignore_eos=True)


@pytest.mark.parametrize(("schema", "problem"), [
    ({"type": "colour"}, "colour"),
    ({"$ref": "#/$defs/missing"}, "missing"),
    ({"type": "string", "format": "mood"}, "mood"),
    ({"type": "object", "properties": {"a": {"type": "integer", "minimum": "x"}}}, "minimum"),
])
def test_schema_the_engine_cannot_enforce_is_refused_by_name(grammars, schema, problem):
    with pytest.raises(ResponseFormatError, match=problem):
        grammars.compile(JsonFormat.of_schema(schema))


def test_a_schema_compiles_once_and_the_cache_is_bounded(grammars):
    before = grammars.compiles
    for _ in range(3):
        grammars.start(JsonFormat.of_schema(POINT))
    assert grammars.compiles == before + 1
    grammars.compile(JsonFormat.of_schema(ORDER))
    grammars.compile(JsonFormat())  # capacity 2: POINT, the least recently used, leaves
    grammars.compile(JsonFormat.of_schema(POINT))
    assert grammars.compiles == before + 4


def test_word_level_tokenizer_is_refused_with_the_reason():
    grammars = Grammars(tiny_tokenizer(VOCAB), VOCAB, {2})
    with pytest.raises(ResponseFormatError, match="unavailable with this model's tokenizer"):
        grammars.compile(JsonFormat())


def _run(engine, requests):
    handles = [engine.submit(r) for r in requests]
    while engine.busy():
        engine.step()
    return [h.result() for h in handles]


def test_constrained_rows_give_valid_json_and_free_rows_are_unaffected(many):
    free = [Request("w1 w2", adapter=a, max_new_tokens=12, ignore_eos=True)
            for a in ("a00", "a01", BASE)]
    formats = [(JsonFormat(), {"type": "object"}), (JsonFormat.of_schema(POINT), POINT),
               (JsonFormat.of_schema(ORDER), ORDER)]
    constrained = [Request("json:", adapter=a, max_new_tokens=300, temperature=1.0, seed=i,
                           constraint=formats[i % 3][0])
                   for i, a in enumerate(["a00", "a01", "a02", BASE, "a02", "a01"])]
    engine = json_engine(many)
    mixed = _run(engine, [constrained[0], free[0], *constrained[1:4], free[1], free[2],
                          *constrained[4:]])
    alone = [_run(engine, [r])[0] for r in free]  # each alone, after the mixed batch
    got_free = [mixed[1], mixed[5], mixed[6]]
    assert [c.tokens for c in got_free] == [c.tokens for c in alone]
    for i, done in enumerate([mixed[0], *mixed[2:5], *mixed[7:]]):
        assert done.finish_reason == FinishReason.STOP, done
        # it ends at the closing brace: no step is spent sampling the end of sequence
        assert EOS not in done.tokens and done.text.endswith("}")
        assert violations(json.loads(done.text), formats[i % 3][1]) == []


def test_budget_runs_out_first_ends_with_length(many):
    engine = json_engine(many)
    (done,) = _run(engine, [Request("json:", max_new_tokens=4, constraint=JsonFormat.of_schema(
        POINT))])
    assert done.finish_reason == FinishReason.LENGTH
    assert '{"name":"'.startswith(done.text)  # the grammar's text so far: not JSON yet
    with pytest.raises(json.JSONDecodeError):
        json.loads(done.text)
