"""Guided decoding: every token a row samples keeps its output a prefix of a text its grammar allows (JSON mode's
object, a JSON Schema's documents, one of a list of choices: `lorakit.serve.schema`), and the row ends when the
text is whole.

    guide = Guide(compile_schema(schema), token_text)    # token_text(id) -> the token's text
    token = guide.pick(logits, temperature, top_p, generator, eos_ids)
    guide.advance(token, eos_ids)

`Guide.pick` draws from the row's own distribution (its temperature and top-p) restricted to the tokens that keep
the output valid: greedily, the most likely valid token. Without top-p the draw is exact, by rejection: a token
drawn from the whole vocabulary (less the invalid ones among the `CANDIDATES` most likely, checked first) is kept
if valid, else removed and another drawn, which is the restricted distribution however little of it the
candidates hold (after `MAX_REJECTIONS` tries, and with top-p, the draw is among the valid candidates; all tokens
are checked only when none of those is valid). An end-of-sequence token is valid once the text is whole; when
nothing may follow, it is the only choice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lorakit.serve.matcher import Matcher
from lorakit.serve.requests import GREEDY_BELOW, sample
from lorakit.serve.schema import JSON_OBJECT, MAX_SPACE, Grammar

CANDIDATES = 256
"""The most likely tokens checked at each step; the whole vocabulary only when none of them is valid."""
MAX_REJECTIONS = 64
"""Most tokens outside the candidates drawn and found invalid in one exact draw before it settles for the valid
candidates."""


class JsonPrefix:
    """JSON mode's automaton with a mutable face: `feed(text)` says whether the text keeps the output a prefix of
    one JSON object (and moves the state only if it does); `complete` is true once the object has closed."""

    def __init__(self, grammar: Grammar = JSON_OBJECT) -> None:
        self.state = Matcher(grammar)

    @property
    def complete(self) -> bool:
        return self.state.complete

    def feed(self, text: str) -> bool:
        nxt = self.state.advance(text)
        if nxt is None:
            return False
        self.state = nxt
        return True


class Guide:
    """A row's guided decoding: the automaton over its output so far, and how it picks tokens."""

    def __init__(self, grammar: Grammar, token_text: Callable[[int], str]) -> None:
        self.state = Matcher(grammar)
        self.token_text = token_text

    def valid(self, token: int, eos_ids: set[int]) -> bool:
        if token in eos_ids:
            return self.state.complete
        text = self.token_text(token)
        return bool(text) and self.state.advance(text) is not None

    def pick(
        self,
        logits: torch.Tensor,
        temperature: float,
        top_p: float,
        generator: torch.Generator | None,
        eos_ids: set[int],
    ) -> int:
        """The next token that keeps the output valid, drawn as `sample` draws (temperature, top-p; greedy below
        GREEDY_BELOW) from `logits` (vocab,) restricted to the valid tokens: exactly, greedy or without top-p (as
        long as MAX_REJECTIONS is not reached); else from the valid ones among the CANDIDATES most likely (all
        valid tokens when none of those is). ValueError if no token is valid."""
        if self.state.finished:  # the text is whole and nothing may follow: end it
            eos = sorted(eos_ids, key=lambda t: -float(logits[t]))
            if not eos:
                raise ValueError("guided decoding needs an end-of-sequence token, and this model has none")
            return eos[0]
        logits = logits.float()
        values, ids = logits.topk(min(CANDIDATES, logits.numel()))
        if temperature < GREEDY_BELOW:  # the first valid token in order: usually the first one
            token = next((t for t in ids.tolist() if self.valid(t, eos_ids)), None)
            if token is None:
                token = next(
                    (t for t in logits.argsort(descending=True).tolist() if self.valid(t, eos_ids)), None
                )
            if token is None or logits[token] == float("-inf"):
                raise ValueError("guided decoding: no token of this model's vocabulary continues the output")
            return token
        ok = [self.valid(t, eos_ids) for t in ids.tolist()]
        if any(ok) and top_p >= 1.0 and len(ids) < logits.numel():
            token = self._draw(logits, temperature, ids, ok, generator, eos_ids)
            if token is not None:
                return token
        if not any(ok):  # rare: scan the whole vocabulary
            values, ids = logits.sort(descending=True)
            ok = [self.valid(t, eos_ids) for t in ids.tolist()]
            if not any(ok):
                raise ValueError("guided decoding: no token of this model's vocabulary continues the output")
        masked = torch.where(torch.tensor(ok), values, float("-inf"))
        return int(ids[sample(masked, temperature, top_p, generator)])

    def _draw(
        self,
        logits: torch.Tensor,
        temperature: float,
        ids: torch.Tensor,
        ok: list[bool],
        generator: torch.Generator | None,
        eos_ids: set[int],
    ) -> int | None:
        """An exact draw from the valid part of softmax(logits / temperature), by rejection (see the module's
        docstring); None after MAX_REJECTIONS invalid tokens outside the candidates."""
        if torch.isnan(logits).any() or torch.isposinf(logits).any():
            return None  # (`sample` has the rules for those)
        probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
        probs[ids[~torch.tensor(ok)]] = 0.0  # the candidates known invalid
        candidates = set(ids.tolist())
        for _ in range(MAX_REJECTIONS):
            if not probs.sum() > 0:
                return None
            token = int(torch.multinomial(probs, 1, generator=generator))
            if token in candidates or self.valid(token, eos_ids):
                return token  # (a candidate still in `probs` is a valid one)
            probs[token] = 0.0
        return None

    def advance(self, token: int, eos_ids: set[int]) -> None:
        if token not in eos_ids:
            nxt = self.state.advance(self.token_text(token))
            if nxt is None:  # pick only returns valid tokens: this is a bug, not bad input
                raise RuntimeError(f"guided decoding: token {token} does not continue the output")
            self.state = nxt


__all__ = ["CANDIDATES", "MAX_REJECTIONS", "MAX_SPACE", "Guide", "JsonPrefix"]
