"""JSON mode (`response_format: {"type": "json_object"}`): every token a row samples keeps its output a prefix of
one JSON object, and the row ends when the object is complete.

    guide = JsonGuide(token_text)                     # token_text(id) -> the token's text
    token = guide.pick(logits, temperature, top_p, generator, eos_ids)
    guide.advance(token)

`JsonPrefix` is a character-level pushdown automaton for RFC 8259 JSON whose top-level value is an object; it
accepts exactly the prefixes of such documents (and a few spaces between tokens: at most `MAX_SPACE` whitespace
characters in a row, so that a model cannot loop on blank lines). `JsonGuide.pick` draws from the row's own
distribution (its temperature and top-p) restricted to the tokens that keep the output such a prefix, among the
`CANDIDATES` most likely (all tokens when none of those is valid): greedily, the most likely valid token. When the
object is complete, only an end-of-sequence token is valid.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from lorakit.serve.requests import GREEDY_BELOW, sample

MAX_SPACE = 4
"""Most whitespace characters in a row outside strings."""
CANDIDATES = 256
"""The most likely tokens checked at each step; the whole vocabulary only when none of them is valid."""

_WS = " \t\n\r"
_HEX = set("0123456789abcdefABCDEF")
_LITERALS = {"t": "true", "f": "false", "n": "null"}


class JsonPrefix:
    """The state after some characters of a JSON document whose top-level value is an object. `feed(text)` says
    whether the text keeps it a prefix (and moves the state only if it does); `complete` is true once the object
    has closed."""

    __slots__ = ("stack", "mode", "part", "space")

    def __init__(self) -> None:
        self.stack: list[str] = []  # open containers: "{" or "["
        self.mode = (
            "top"  # top, value, key_or_end, key, colon, after, string, key_string, number, literal, done
        )
        self.part = ""  # number: what it holds so far; literal: what is left of it; strings: escape state
        self.space = 0  # whitespace characters in a row

    @property
    def complete(self) -> bool:
        return self.mode == "done"

    def copy(self) -> JsonPrefix:
        other = JsonPrefix.__new__(JsonPrefix)
        other.stack, other.mode, other.part, other.space = list(self.stack), self.mode, self.part, self.space
        return other

    def feed(self, text: str) -> bool:
        trial = self.copy()
        for ch in text:
            if not trial._char(ch):
                return False
        self.stack, self.mode, self.part, self.space = trial.stack, trial.mode, trial.part, trial.space
        return True

    # -- one character -----------------------------------------------------------------------------------------

    def _char(self, ch: str) -> bool:
        mode = self.mode
        if ch not in _WS:
            self.space = 0
        if mode in ("string", "key_string"):
            return self._string(ch)
        if mode == "number":
            if self._number(ch):
                return True
            if not _number_done(self.part):
                return False
            self.mode = "after"  # the number ended: this character belongs to what follows it
            return self._char(ch)
        if mode == "literal":
            if not self.part or ch != self.part[0]:
                return False
            self.part = self.part[1:]
            if not self.part:
                self.mode = "after"
            return True
        if ch in _WS:
            if mode == "done" or self.space >= MAX_SPACE:
                return False
            self.space += 1
            return True
        if mode == "top":
            return self._open(ch) if ch == "{" else False
        if mode == "value":
            return self._value(ch)
        if mode == "key_or_end":
            if ch == "}":
                return self._close("{")
            return self._start_key(ch)
        if mode == "key":
            return self._start_key(ch)
        if mode == "colon":
            if ch != ":":
                return False
            self.mode = "value"
            return True
        if mode == "after":
            return self._after(ch)
        return False  # done: nothing may follow

    def _value(self, ch: str) -> bool:
        if ch in "{[":
            return self._open(ch)
        if ch == "]" and self.stack and self.stack[-1] == "[" and self.part == "empty":
            return self._close("[")  # an empty array: "[" then "]"
        self.part = ""
        if ch == '"':
            self.mode = "string"
            return True
        if ch == "-" or ch.isdigit() and ch.isascii():
            self.mode, self.part = "number", ch
            return True
        if ch in _LITERALS:
            self.mode, self.part = "literal", _LITERALS[ch][1:]
            return True
        return False

    def _open(self, ch: str) -> bool:
        self.stack.append(ch)
        self.mode, self.part = ("key_or_end", "") if ch == "{" else ("value", "empty")
        return True

    def _close(self, opener: str) -> bool:
        if not self.stack or self.stack[-1] != opener:
            return False
        self.stack.pop()
        self.mode, self.part = ("after" if self.stack else "done"), ""
        return True

    def _start_key(self, ch: str) -> bool:
        if ch != '"':
            return False
        self.mode, self.part = "key_string", ""
        return True

    def _after(self, ch: str) -> bool:
        if not self.stack:
            return False
        if ch == ",":
            self.mode, self.part = ("key" if self.stack[-1] == "{" else "value"), ""
            return True
        if ch in "}]":
            return self._close("{" if ch == "}" else "[")
        return False

    def _string(self, ch: str) -> bool:
        esc = self.part
        if esc == "\\":  # after a backslash
            if ch == "u":
                self.part = "u"
            elif ch in '"\\/bfnrt':
                self.part = ""
            else:
                return False
            return True
        if esc.startswith("u"):  # \\u and up to 4 hex digits so far
            if ch not in _HEX:
                return False
            self.part = "" if len(esc) == 4 else esc + ch
            return True
        if ch == "\\":
            self.part = "\\"
            return True
        if ch == '"':
            self.mode = "colon" if self.mode == "key_string" else "after"
            self.part = ""
            return True
        return ord(ch) >= 0x20  # control characters must be escaped

    def _number(self, ch: str) -> bool:
        """Whether `ch` extends the number (self.part) as a valid prefix of one."""
        candidate = self.part + ch
        if _number_prefix(candidate):
            self.part = candidate
            return True
        return False


_NUMBER_PREFIX = re.compile(r"-?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*|(?:\.[0-9]+)?[eE][+-]?[0-9]*)?)?")
r"""The prefixes of a JSON number, -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?, cut anywhere."""


def _number_prefix(s: str) -> bool:
    return _NUMBER_PREFIX.fullmatch(s) is not None


def _number_done(s: str) -> bool:
    """Whether the number prefix `s` is a whole number (it may end here)."""
    return _number_prefix(s) and s[-1:].isdigit()


class JsonGuide:
    """A row's JSON mode: the automaton over its output so far, and how it picks tokens."""

    def __init__(self, token_text: Callable[[int], str]) -> None:
        self.state = JsonPrefix()
        self.token_text = token_text

    def valid(self, token: int, eos_ids: set[int]) -> bool:
        if token in eos_ids:
            return self.state.complete
        text = self.token_text(token)
        return bool(text) and self.state.copy().feed(text)

    def pick(
        self,
        logits: torch.Tensor,
        temperature: float,
        top_p: float,
        generator: torch.Generator | None,
        eos_ids: set[int],
    ) -> int:
        """The next token, drawn as `sample` draws (temperature, top-p; greedy below GREEDY_BELOW) from the
        CANDIDATES most likely tokens of `logits` (vocab,) that keep the output valid; from all valid tokens when
        none of those is. ValueError if no token is valid."""
        if self.state.complete:  # the object is whole: end it (the most likely end-of-sequence token)
            eos = sorted(eos_ids, key=lambda t: -float(logits[t]))
            if not eos:
                raise ValueError("JSON mode needs an end-of-sequence token, and this model has none")
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
                raise ValueError("JSON mode: no token of this model's vocabulary continues the JSON output")
            return token
        ok = [self.valid(t, eos_ids) for t in ids.tolist()]
        if not any(ok):  # rare: scan the whole vocabulary
            values, ids = logits.sort(descending=True)
            ok = [self.valid(t, eos_ids) for t in ids.tolist()]
            if not any(ok):
                raise ValueError("JSON mode: no token of this model's vocabulary continues the JSON output")
        masked = torch.where(torch.tensor(ok), values, float("-inf"))
        return int(ids[sample(masked, temperature, top_p, generator)])

    def advance(self, token: int, eos_ids: set[int]) -> None:
        if token not in eos_ids:
            self.state.feed(self.token_text(token))


__all__ = ["CANDIDATES", "MAX_SPACE", "JsonGuide", "JsonPrefix"]
