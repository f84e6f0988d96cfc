"""A running request in the engine's batch: its tokens, its text, and when it is done.

The engine owns the batch; a ``Row`` owns what is one request's alone: its generator, the
tokens sampled so far with its own settings, and the text streamed so far (held back
where a stop string may be starting or a character is incomplete).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from loratree.errors import NonFiniteError
from loratree.ops.logprobs import token_logprobs
from loratree.ops.sampling import sample
from loratree.serve.constrain import Constraint
from loratree.serve.requests import FinishReason, Handle, TokenLogprob

__all__ = ["Row", "finite_rows", "records"]


@dataclass
class Row:
    handle: Handle
    adapter: str
    slot: int
    prompt_len: int
    next_pos: int
    """The position of the next token fed (the last sampled one)."""
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    first_token_s: float = 0.0
    error: BaseException | None = None
    constraint: Constraint | None = None
    """The grammar state of a request with a ``constraint`` (``serve.constrain``)."""
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    """The prompt tokens' records (``Request.prompt_logprobs``), set at prefill."""

    @classmethod
    def start(cls, handle: Handle, adapter: str, slot: int, prompt_len: int,
              next_pos: int, constraint: Constraint | None = None) -> Row:
        """The row of a request whose prompt was just prefilled; choice j of a request
        samples with seed ``seed + j``."""
        seed = handle.request.seed
        generator = (None if seed is None
                     else torch.Generator().manual_seed(seed + handle.choice))
        return cls(handle, adapter, slot, prompt_len, next_pos, generator,
                   constraint=constraint)

    def take(self, logits: torch.Tensor, finite: bool) -> None:
        """Sample the next token from ``logits`` (V,), or record why not (the row then
        fails alone)."""
        req = self.handle.request
        if not finite:
            self.error = NonFiniteError(
                f"adapter {self.adapter!r} produced non-finite logits at token "
                f"{len(self.tokens)}")
            return
        raw = logits
        try:
            if self.constraint is not None:  # only the tokens its grammar allows
                logits = self.constraint.mask(logits)
            token = sample(logits, req.temperature, req.top_k, req.top_p, self.generator)
        except (RuntimeError, ValueError) as e:  # this request's settings: it fails alone
            self.error = ValueError(f"sampling failed: {e}")
            return
        if not self.tokens:
            self.first_token_s = time.perf_counter() - self.handle.submitted
        self.tokens.append(token)
        if self.constraint is not None:
            try:
                self.constraint.advance(token)
            except RuntimeError as e:
                self.error = e
        if self.handle.logprobs is not None:
            self._record_logprob(raw, token)

    def _record_logprob(self, logits: torch.Tensor, token: int) -> None:
        """The sampled token's record, from the logits it was sampled from (raw: before
        temperature, top-k, top-p and any grammar mask; ``ops.logprobs``)."""
        k = self.handle.request.logprobs or 0
        chosen, values, ids = token_logprobs(logits[None], torch.tensor([token]), k)
        self.handle.logprobs.append(records([token], chosen, values, ids)[0])

    def status(self, tokenizer: object, eos: set[int]) -> tuple[FinishReason | None, str]:
        """(finish reason or None, the text so far); streams the new text."""
        req = self.handle.request
        if self.error is not None:
            return FinishReason.ERROR, self.text
        ended_by_eos = bool(self.tokens) and self.tokens[-1] in eos and not req.ignore_eos
        tokens = self.tokens[:-1] if ended_by_eos else self.tokens
        # a constrained row also ends when its JSON is complete, as at the end of sequence
        ended_by_eos |= self.constraint is not None and self.constraint.finished
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        for s in req.stop:
            cut = text.find(s)
            if cut >= 0:
                self._stream(text[:cut], final=True)
                return FinishReason.STOP, text[:cut]
        if self.handle.cancelled:
            return FinishReason.CANCELLED, text
        if ended_by_eos or len(self.tokens) >= req.max_new_tokens:
            self._stream(text, final=True)
            return (FinishReason.STOP if ended_by_eos else FinishReason.LENGTH), text
        self._stream(text, final=False, hold=max((len(s) for s in req.stop), default=1) - 1)
        return None, text

    def _stream(self, text: str, *, final: bool, hold: int = 0) -> None:
        """Send the text not yet sent, holding back a possible start of a stop string and
        an incomplete character."""
        upto = len(text) if final else max(len(self.text), len(text) - hold)
        if not final:
            while upto > len(self.text) and text[upto - 1] == "\ufffd":
                upto -= 1
        if upto > len(self.text):
            self.handle._emit(text[len(self.text):upto])
            self.text = text[:upto]


def records(tokens: list[int], chosen: torch.Tensor, values: torch.Tensor,
            ids: torch.Tensor) -> list[TokenLogprob]:
    """``ops.logprobs.token_logprobs``'s tensors as one record per token."""
    chosen_l, values_l, ids_l = chosen.tolist(), values.tolist(), ids.tolist()
    return [TokenLogprob(t, lp, tuple(zip(i, v, strict=True)))
            for t, lp, v, i in zip(tokens, chosen_l, values_l, ids_l, strict=True)]


def finite_rows(logits: torch.Tensor) -> list[bool]:
    """Per row, whether all its logits are finite: one reduction for the batch (a row's
    sum is finite iff every entry is, short of overflow past 3e38, which no sane logit
    reaches)."""
    return torch.isfinite(logits.sum(-1, dtype=torch.float32)).tolist()
