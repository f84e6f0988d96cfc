"""OpenAI's per-choice outputs from the engine's completions: ``logprobs`` objects and echo.

Chat: ``choice.logprobs = {"content": [{token, logprob, bytes, top_logprobs: [{token,
logprob, bytes}]}], "refusal": None}`` with exactly ``top_logprobs`` alternatives.
Completions (the legacy shape): ``{tokens, token_logprobs, top_logprobs, text_offset}``,
each ``top_logprobs`` entry a dict token -> logprob holding the ``logprobs`` most probable
tokens and the chosen one (so up to ``logprobs`` + 1 entries, as OpenAI and vLLM answer).
With ``echo`` the lists start with the prompt's tokens, the first with None for its
logprob and alternatives; ``text_offset`` counts characters from the start of the prompt.

The numbers are the engine's (``ops.logprobs``: raw logits, before temperature, top-k and
top-p). A logprob below ``FLOOR`` (-inf, from a model that masks tokens) is answered as
``FLOOR``, since JSON has no infinity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from loratree.serve.openai_api import choice_body
from loratree.serve.requests import Completion, TokenLogprob

__all__ = ["FLOOR", "Outputs"]

FLOOR = -9999.0


def _finite(lp: float) -> float:
    return max(lp, FLOOR)


@dataclass
class Outputs:
    """How one HTTP request's choices are answered: chat or completions, the alternatives
    per token (``k``; None: no logprobs), and whether the prompt is echoed."""

    tokenizer: object
    chat: bool
    k: int | None
    echo: bool = False
    _texts: dict[int, str] = field(default_factory=dict, repr=False)

    def token_text(self, token: int) -> str:
        """A token's text on its own (cached)."""
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.tokenizer.decode([token])
        return text

    def choice(self, index: int, done: Completion, prompt: Sequence[int],
               finish: str) -> dict:
        """A whole response's choice ``index`` for ``done``, whose prompt was ``prompt``."""
        head = self.tokenizer.decode(list(prompt)) if self.echo else ""
        logprobs = None
        if self.k is not None and self.chat:
            logprobs = self.chat_logprobs(done.logprobs or ())
        elif self.k is not None:
            tokens, records = list(done.tokens), list(done.logprobs or ())
            offset = len(self.tokenizer.decode(list(prompt)))
            if self.echo:
                tokens, offset = list(prompt) + tokens, 0
                records = list(done.prompt_logprobs or [None] * len(prompt)) + records
            logprobs = self.completion_logprobs(tokens, records, offset)
        return choice_body(chat=self.chat, index=index, text=head + done.text, finish=finish,
                           logprobs=logprobs)

    def chat_logprobs(self, records: Sequence[TokenLogprob]) -> dict:
        def entry(token: int, lp: float) -> dict:
            text = self.token_text(token)
            return {"token": text, "logprob": _finite(lp), "bytes": list(text.encode())}

        return {"content": [{**entry(r.token, r.logprob),
                             "top_logprobs": [entry(t, lp) for t, lp in r.top]}
                            for r in records], "refusal": None}

    def completion_logprobs(self, tokens: Sequence[int],
                            records: Sequence[TokenLogprob | None], offset: int) -> dict:
        """The legacy object for ``tokens`` (a record each, None for the prompt's first),
        the first token's text starting at character ``offset``."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                "text_offset": []}
        for token, r in zip(tokens, records, strict=True):
            text = self.token_text(token)
            out["tokens"].append(text)
            out["text_offset"].append(offset)
            offset += len(text)
            if r is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            top: dict[str, float] = {}
            for t, lp in r.top:
                top.setdefault(self.token_text(t), _finite(lp))
            top.setdefault(text, _finite(r.logprob))
            out["token_logprobs"].append(_finite(r.logprob))
            out["top_logprobs"].append(top)
        return out

    def chunk_logprobs(self, records: Sequence[TokenLogprob], offset: int) -> dict | None:
        """A stream chunk's logprobs for the generated tokens it carries (None without)."""
        if self.k is None:
            return None
        if self.chat:
            return self.chat_logprobs(records)
        return self.completion_logprobs([r.token for r in records], records, offset)
