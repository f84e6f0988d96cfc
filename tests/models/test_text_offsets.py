"""Completions' ``tokens`` and ``text_offset`` on the embedded SmolLM2 tokenizer (byte-level
BPE), the way vLLM builds them: each token's own text, offsets adding up their lengths."""

from loratree.serve.openai_outputs import Outputs


def offsets(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = Outputs(tokenizer, chat=False, k=0).completion_logprobs(ids, [None] * len(ids), 0)
    return tokenizer.decode(ids), out["tokens"], out["text_offset"]


def test_offsets_point_at_each_token_in_the_decoded_text(embedded):
    tokenizer = embedded.gguf_tokenizer
    for text in ("Hello, world! It's 3.14 -- ok?\n  Next line:\tTab.",
                 "Convert to ISO 8601: November 13, 2075 => 2075-11-13",
                 "don't , . ! ? 's n't (a) [b] {c} <d> #e $f"):
        full, tokens, starts = offsets(tokenizer, text)
        assert full == text
        for token, start in zip(tokens, starts, strict=True):
            assert full[start:start + len(token)] == token, (token, start)
        assert starts[-1] + len(tokens[-1]) == len(full)


def test_a_character_split_across_tokens_shifts_later_offsets(embedded):
    """A multi-byte character that spans tokens has no text of its own per token (each
    part decodes to U+FFFD), so later offsets shift; vLLM answers the same. Documented."""
    full, tokens, starts = offsets(embedded.gguf_tokenizer, "naïve 日本 ok")
    assert "\ufffd" in "".join(tokens)
    assert starts[-1] + len(tokens[-1]) != len(full)
