"""Training data: line-numbered row errors, assistant-only labels, padding and batch order.

Labels are checked with two tokenizers: the real SmolLM2 one (its own chat template) and a
word-level one built here with no chat template (the built-in template).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from loratree.models import EMBEDDED_NAME, cache_root, embedded_gguf_path
from loratree.models.chat import Conversation, Message, encode_messages, render
from loratree.train.data import (
    DataError,
    Example,
    batch_order,
    collate,
    encode,
    encode_prompt,
    from_records,
    pad_token_id,
    prompt_messages,
    read_jsonl,
    reference,
)

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6, I think."},
    ]
}
TINY_CHAT = {
    "messages": [
        {"role": "user", "content": "w5 w6"},
        {"role": "assistant", "content": "w7 w8 w9"},
        {"role": "user", "content": "w10"},
        {"role": "assistant", "content": "w11"},
    ]
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word level, no chat template: ``"w5 w7"`` -> ``[5, 7]``; role markers are tokens."""
    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 100)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<|system|>", "<|user|>", "<|assistant|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="session")
def smollm2() -> PreTrainedTokenizerBase:
    """The embedded SmolLM2 tokenizer: from the converted cache if there, else the GGUF."""
    cached = cache_root() / "models" / EMBEDDED_NAME
    if (cached / ".complete").is_file():  # embedded.py writes the marker last
        return AutoTokenizer.from_pretrained(cached, local_files_only=True)
    try:
        gguf = embedded_gguf_path()
    except RuntimeError as e:
        pytest.skip(str(e))
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)


@pytest.fixture(scope="session")
def tiny() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def labelled_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The maximal runs of labelled tokens; every label must equal its token id."""
    runs: list[list[int]] = []
    previous = -100
    for token, label in zip(ids, labels, strict=True):
        if label != -100:
            assert label == token
            if previous == -100:
                runs.append([])
            runs[-1].append(token)
        previous = label
    return runs


def assistant_texts(row: dict) -> list[str]:
    return [m["content"] for m in row["messages"] if m["role"] == "assistant"]


# --- rows ---------------------------------------------------------------------------------


def test_read_jsonl_normalises_both_shapes_and_ignores_blank_lines(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [json.dumps({"prompt": "Hi", "completion": "Hello", "id": 7}), "", "  ", json.dumps(CHAT)],
    )
    rows = read_jsonl(path)
    assert (len(rows), rows.skipped, rows.source) == (2, 0, str(path))
    assert rows.rows[0] == Conversation((Message("user", "Hi"), Message("assistant", "Hello")))
    assert [m.role for m in rows.rows[1].messages] == [m["role"] for m in CHAT["messages"]]
    assert reference(rows.rows[1]) == "6, I think."
    assert prompt_messages(rows.rows[1]) == rows.rows[1].messages[:4]


BAD_ROWS = [
    ('{"prompt": "a", "completion": ', "not valid JSON"),
    ('["a", "b"]', 'a row must be a JSON object, got ["a", "b"]'),
    ('{"prompt": "a"}', 'missing "completion"'),
    ('{"prompt": "a", "completion": 3}', '"completion" must be a non-empty string, got 3'),
    ('{"prompt": "", "completion": "b"}', '"prompt" must be a non-empty string, got ""'),
    ('{"prompt": " \\n", "completion": "b"}', '"prompt" must be a non-empty string'),
    ('{"text": "a"}', 'needs "prompt" and "completion", or "messages"; it has keys ["text"]'),
    ('{"messages": "hi"}', '"messages" must be a non-empty list, got "hi"'),
    ('{"messages": []}', '"messages" must be a non-empty list, got []'),
    ('{"messages": ["hi"]}', '"messages"[0] must be an object with "role" and "content"'),
    ('{"messages": [{"role": "bot", "content": "x"}]}', '"messages"[0].role must be one of'),
    (
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}',
        '"messages"[1].content must be a non-empty string, got ""',
    ),
    ('{"messages": [{"role": "user", "content": 5}]}', '"messages"[0].content must be a non'),
    ('{"messages": [{"role": "user", "content": "q"}]}', '"messages" has no assistant turn'),
    (
        '{"messages": [{"role": "assistant", "content": "a"}]}',
        '"messages" must not start with an assistant turn',
    ),
    (
        '{"prompt": "a", "completion": "b", "messages": [{"role": "user", "content": "q"}]}',
        'has "messages" or "prompt" and "completion", not both',
    ),
]


@pytest.mark.parametrize(("line", "problem"), BAD_ROWS, ids=[p[:30] for _, p in BAD_ROWS])
def test_bad_row_error_names_file_line_and_problem(tmp_path: Path, line: str, problem: str) -> None:
    good = json.dumps({"prompt": "a", "completion": "b"})
    path = write_jsonl(tmp_path / "train.jsonl", [good, "", line, good])
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert problem in str(info.value)


def test_invalid_utf8_is_a_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl:2: not valid UTF-8"):
        read_jsonl(path)


def test_skip_bad_rows_counts_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lines = [json.dumps({"prompt": "a", "completion": "b"})] + [line for line, _ in BAD_ROWS]
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="loratree.train.data"):
        rows = read_jsonl(path, skip_bad_rows=True)
    assert (len(rows), rows.skipped) == (1, len(BAD_ROWS))
    assert f"skipped {len(BAD_ROWS)} bad row(s)" in caplog.text
    assert f"{path}:2: not valid JSON" in caplog.text  # the first bad row, located


def test_no_rows_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no rows"):
        read_jsonl(write_jsonl(tmp_path / "empty.jsonl", ["", "   "]))
    with pytest.raises(DataError, match=r"no rows \(1 bad row\(s\) skipped"):
        read_jsonl(write_jsonl(tmp_path / "bad.jsonl", ["[]"]), skip_bad_rows=True)
    with pytest.raises(DataError, match="cannot read"):
        read_jsonl(tmp_path / "missing.jsonl")


class FakeDataset:
    """A ``datasets.Dataset`` stand-in: column_names, and rows with None in absent columns."""

    def __init__(self, rows: list[dict], columns: tuple[str, ...]) -> None:
        self.column_names = list(columns)
        self._rows = rows

    def __iter__(self) -> Iterator[dict]:
        return ({c: row.get(c) for c in self.column_names} for row in self._rows)


def test_from_records_takes_dicts_and_dataset_like_objects() -> None:
    rows = [{"prompt": "Hi", "completion": "Hello"}, CHAT]
    dataset = FakeDataset(rows, ("prompt", "completion", "messages"))
    assert from_records(rows).rows == from_records(dataset, source="ds").rows
    with pytest.raises(DataError, match=r'^dataset\[1\]: missing "completion"'):
        from_records([{"prompt": "a", "completion": "b"}, {"prompt": "a"}])
    with pytest.raises(DataError, match=r'^ds: needs a "messages" column'):
        from_records(FakeDataset([], ("text",)), source="ds")
    with pytest.raises(TypeError, match="read_jsonl"):
        from_records("train.jsonl")  # type: ignore[arg-type]


# --- encoding -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["smollm2", "tiny"])
def test_prompt_completion_and_chat_encode_identically(
    request: pytest.FixtureRequest, name: str
) -> None:
    tokenizer = request.getfixturevalue(name)
    chat = {"messages": [{"role": "user", "content": "w5"}, {"role": "assistant", "content": "w6"}]}
    rows = from_records([{"prompt": "w5", "completion": "w6"}, chat])
    first, second = encode(rows, tokenizer, max_length=512).examples
    assert first == second


def test_smollm2_labels_are_exactly_the_assistant_turns_and_im_end(smollm2) -> None:
    rows = from_records([CHAT, {"prompt": "Hi there", "completion": "Hello!"}])
    for row, example in zip(
        [CHAT, {"messages": [{"role": "assistant", "content": "Hello!"}]}],
        encode(rows, smollm2, max_length=512).examples,
        strict=True,
    ):
        runs = labelled_runs(example.input_ids, example.labels)
        assert [smollm2.decode(run) for run in runs] == [
            text + "<|im_end|>" for text in assistant_texts(row)
        ]
        # everything else (system prompt, user turns, headers, newlines) is masked
        assert sum(map(len, runs)) == sum(label != -100 for label in example.labels)


def test_builtin_template_labels_assistant_content_and_eos(tiny) -> None:
    assert tiny.chat_template is None
    (example,) = encode(from_records([TINY_CHAT]), tiny, max_length=512).examples
    expected = [
        tiny(text + "</s>", add_special_tokens=False)["input_ids"]
        for text in assistant_texts(TINY_CHAT)
    ]
    assert labelled_runs(example.input_ids, example.labels) == expected == [[7, 8, 9, 2], [11, 2]]
    text = render(from_records([TINY_CHAT]).rows[0].messages, tiny)
    assert (
        text == "<|user|>\nw5 w6\n<|assistant|>\nw7 w8 w9</s><|user|>\nw10\n<|assistant|>\nw11</s>"
    )


@pytest.mark.parametrize("name", ["smollm2", "tiny"])
def test_encode_prompt_is_the_training_prefix_of_the_final_turn(
    request: pytest.FixtureRequest, name: str
) -> None:
    tokenizer = request.getfixturevalue(name)
    (conversation,) = from_records([CHAT if name == "smollm2" else TINY_CHAT]).rows
    ids, labels = encode_messages(conversation.messages, tokenizer)
    prompt = encode_prompt(prompt_messages(conversation), tokenizer)
    assert ids[: len(prompt)] == prompt
    assert labels[len(prompt)] != -100 and labels[len(prompt) - 1] == -100


def test_merge_across_the_turn_start_falls_back_to_offsets(smollm2, monkeypatch) -> None:
    # "Assistant: " ends in a lone "Ġ" token, which the full text merges into "ĠHello".
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
        "{% else %}Assistant: {{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Assistant: {% endif %}"
    )
    monkeypatch.setattr(smollm2, "chat_template", template)
    (example,) = encode(
        from_records([{"prompt": "Hi", "completion": "Hello!"}]), smollm2, 64
    ).examples
    runs = labelled_runs(example.input_ids, example.labels)
    assert [smollm2.decode(run) for run in runs] == [" Hello!<|im_end|>"]


def test_template_that_rewrites_earlier_turns_is_refused(tiny, monkeypatch) -> None:
    reversed_turns = "{% for m in messages|reverse %}{{ m['content'] }}\n{% endfor %}"
    monkeypatch.setattr(tiny, "chat_template", reversed_turns)
    with pytest.raises(ValueError, match="cannot locate assistant turn 1"):
        encode(from_records([TINY_CHAT]), tiny, 64)


def test_no_template_and_no_eos_is_refused() -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="no chat template and no eos_token"):
        encode(from_records([TINY_CHAT]), tokenizer, 64)


def test_truncation_and_dropping_are_counted(tiny, caplog: pytest.LogCaptureFixture) -> None:
    short = {"prompt": "w5", "completion": "w6"}  # <|user|> w5 <|assistant|> w6 </s>: 5 tokens
    rows = from_records([short, TINY_CHAT])  # TINY_CHAT: 3 + 5 + 2 + 3 = 13 tokens
    assert encode(rows, tiny, 13).lengths == [5, 13]
    with caplog.at_level(logging.WARNING, logger="loratree.models.chat"):
        encoded = encode(rows, tiny, 6)
    assert (encoded.truncated, encoded.dropped, encoded.lengths) == (1, 0, [5, 6])
    assert encoded.examples[1].labels == [-100] * 4 + [7, 8]
    assert "truncated 1 of 2 example(s) to max_length=6" in caplog.text
    encoded = encode(rows, tiny, 3)  # no assistant token survives in either
    assert (encoded.truncated, encoded.dropped, len(encoded)) == (2, 2, 0)
    with pytest.raises(ValueError, match="max_length"):
        encode(rows, tiny, 0)


# --- batching -----------------------------------------------------------------------------


def test_collate_right_pads() -> None:
    examples = [Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])]
    batch = collate(examples, pad_id=0)
    assert {k: v.shape for k, v in batch.items()} == {k: (2, 3) for k in batch}
    assert all(v.dtype == torch.long for v in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    with pytest.raises(ValueError, match="empty"):
        collate([], pad_id=0)


def test_pad_token_id_falls_back_to_eos(tiny) -> None:
    assert tiny.pad_token is None and pad_token_id(tiny) == 2


@pytest.mark.parametrize("group", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_batch_order_covers_every_index_once(shuffle: bool, group: bool) -> None:
    lengths = [(i * 37) % 101 for i in range(1003)]
    batches = batch_order(
        1003,
        8,
        seed=0,
        epoch=0,
        shuffle=shuffle,
        group_by_length=group,
        lengths=lengths,
        chunk_batches=5,
    )
    assert sorted(i for b in batches for i in b) == list(range(1003))
    assert sorted(map(len, batches)) == [3] + [8] * 125  # only the last batch is short
    if not shuffle and not group:
        assert batches[0] == list(range(8))


def test_batch_order_is_deterministic_and_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    kwargs = {"group_by_length": True, "lengths": list(range(100))}
    first = batch_order(100, 4, seed=3, epoch=1, **kwargs)
    assert first == batch_order(100, 4, seed=3, epoch=1, **kwargs)
    assert first != batch_order(100, 4, seed=3, epoch=2, **kwargs)
    assert first != batch_order(100, 4, seed=4, epoch=1, **kwargs)
    assert torch.equal(state, torch.get_rng_state())


def test_group_by_length_reduces_padding_variance() -> None:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 512, (2000,), generator=g).tolist()

    def spread(batches: list[list[int]]) -> float:
        return sum(
            torch.tensor([lengths[i] for i in b]).float().var().item()
            for b in batches
            if len(b) > 1
        ) / len(batches)

    grouped = batch_order(2000, 16, seed=0, epoch=0, group_by_length=True, lengths=lengths)
    plain = batch_order(2000, 16, seed=0, epoch=0)
    assert spread(grouped) < 0.1 * spread(plain)
    # batches stay in random order: not sorted by length across the epoch
    firsts = [lengths[b[0]] for b in grouped]
    assert firsts != sorted(firsts, reverse=True)


def test_batch_order_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        batch_order(10, 0, seed=0, epoch=0)
    with pytest.raises(ValueError, match="group_by_length needs 10 lengths, got none"):
        batch_order(10, 2, seed=0, epoch=0, group_by_length=True)


def test_a_row_with_nothing_to_learn_is_an_error_naming_its_line(tiny, tmp_path, monkeypatch
                                                                 ) -> None:
    """A row whose texts encode to no token a model can predict (labels only at position
    0, or none) is refused with its file and line, not trained on with loss 0. The
    tokenizer that encodes a text to nothing is stood in for by the encoding of row 2."""
    import loratree.models.chat as chat

    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "completion": "w6"})
                              for p in ("w5", "w7", "w8")) + "\n")
    real = chat.encode_messages

    def encode_messages(messages, tokenizer):
        if messages[0].content == "w7":  # as if the prompt and template gave no token
            return [6, 2], [6, -100]  # the only label at position 0
        return real(messages, tokenizer)

    monkeypatch.setattr(chat, "encode_messages", encode_messages)
    with pytest.raises(chat.EmptyRowError, match=r"train\.jsonl:2: the row encodes to no"):
        encode(read_jsonl(path), tiny, 64)
    monkeypatch.setattr(chat, "encode_messages", real)
    assert len(encode(read_jsonl(path), tiny, 64)) == 3
