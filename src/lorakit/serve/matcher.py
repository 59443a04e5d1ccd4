"""The automaton of structured output: the states a text can be in while it is still the start of a text that a
`lorakit.serve.schema.Grammar` allows.

    state = Matcher(compile_schema(schema))
    state = state.advance('{"name": "Ada')     # None if the text cannot start an allowed document
    state.complete                             # the text so far is a whole document

It follows all alternatives at once (a set of parser stacks, each an immutable linked list of frames), so
advancing and copying are cheap, and `anyOf` costs nothing until a character tells the branches apart.

A stack is None (the document is whole) or (frame, rest). Frames:
    ("V", node)                       a value of `node` comes next
    ("O", node, i, stage)             in an object; properties from index i on may come; stage: open (after "{"),
                                      comma (after a member), next (after ",")
    ("K", node, i, typed, esc)        in a key; i >= 0: one of the properties from i on, `typed` so far;
                                      i == -1: any key (esc: the escape state, as in strings)
    ("C", node, j)                    a colon comes next, then the value of property j (-1: of any key)
    ("A", node, count, stage)         in an array holding `count` values; stage: open, comma, next
    ("S", node, length, esc, value)   in a string value of `length` characters so far (`value`: their decoded
                                      text, kept only when the string has a pattern)
    ("R", pattern, text)              in a text that a regular expression must fullmatch (guided_regex)
    ("N", node, text)                 in a number (`node`: its Num, which says what it may become)
    ("L", options, typed)             in a literal: `typed` so far, `options` the texts it may still become
"""

from __future__ import annotations

from lorakit.serve.numbers import Num
from lorakit.serve.schema import AnyOf, Arr, Grammar, Lit, Obj, Ref, Rx, Str

MAX_ALTERNATIVES = 64
"""Most parser stacks followed at once (more are dropped: what is generated stays valid, only less varied)."""

_WS = " \t\n"
"""The whitespace generated between tokens of a document. JSON allows a carriage return too; it is never generated:
no one wants one in an answer, and a reader that splits lines on it (Python's `splitlines`) would cut the document."""
_HEX = frozenset("0123456789abcdefABCDEF")


class Matcher:
    """The states a text so far can be in; immutable (`advance` returns a new one)."""

    __slots__ = ("grammar", "alts")

    def __init__(self, grammar: Grammar, alts: frozenset | None = None) -> None:
        self.grammar = grammar
        self.alts = alts if alts is not None else frozenset({((("V", grammar.root), None), 0)})

    def advance(self, text: str) -> Matcher | None:
        """The state after `text`, or None if no allowed document starts with what came before and `text`."""
        alts = self.alts
        for ch in text:
            nxt: set = set()
            for stack, space in alts:
                for result in _step(stack, space, ch, self.grammar.space):
                    if len(nxt) < MAX_ALTERNATIVES:
                        nxt.add(result)
            if not nxt:
                return None
            alts = frozenset(nxt)
        return Matcher(self.grammar, alts)

    @property
    def complete(self) -> bool:
        """The text so far is a whole allowed document."""
        return any(_can_end(stack) for stack, _ in self.alts)

    @property
    def finished(self) -> bool:
        """Complete, and nothing may follow."""
        return all(stack is None or (stack[1] is None and _closed(stack[0])) for stack, _ in self.alts)


def _can_end(stack) -> bool:
    if stack is None:
        return True
    frame, rest = stack
    return rest is None and _value_done(frame)


def _closed(frame) -> bool:
    """Whether a number or literal frame holds a whole value that no character can extend."""
    if frame[0] == "N":
        return frame[1].whole(frame[2]) and not any(frame[1].prefix(frame[2] + c) for c in "0123456789.eE")
    return frame[0] == "L" and frame[1] == (frame[2],)


def _value_done(frame) -> bool:
    """Whether a number, literal or pattern frame holds a whole value (it may end at the next character)."""
    if frame[0] == "R":
        m = frame[1].fullmatch(frame[2], partial=True)
        return m is not None and not m.partial
    if frame[0] == "N":
        return frame[1].whole(frame[2])
    if frame[0] == "L":
        return frame[2] in frame[1]
    return False


def _step(stack, space: int, ch: str, cap: int) -> list:
    """The (stack, space) pairs after `ch`."""
    if stack is None:
        return []  # nothing may follow a whole document
    frame, rest = stack
    tag = frame[0]
    if tag == "S":
        return _string(frame, rest, ch)
    if tag == "K":
        return _key(frame, rest, ch)
    if tag in ("N", "L", "R"):
        out = _extend(frame, rest, ch)
        if _value_done(frame):  # the value may also end here: the character belongs to what follows
            out += _step(rest, space, ch, cap)
        return out
    if ch in _WS:
        return [(stack, space + 1)] if space < cap else []
    if tag == "V":
        return _value(frame[1], rest, ch, set())
    if tag == "O":
        return _object(frame, rest, ch)
    if tag == "C":
        if ch != ":":
            return []
        _, node, j = frame
        value = node.props[j][1] if j >= 0 else node.extra
        return [((("V", value), (("O", node, j + 1, "comma"), rest)), 0)]
    if tag == "A":
        return _array(frame, rest, ch)
    return []


def _value(node, rest, ch: str, seen: set) -> list:
    """A value of `node` starting with `ch` (not whitespace)."""
    hops = 0
    while isinstance(node, Ref):  # a $ref to a $ref ...: a cycle of them allows nothing
        node, hops = node.resolve(), hops + 1
        if hops > 64:
            return []
    if isinstance(node, AnyOf):
        if id(node) in seen:  # a cycle of alternatives that consumes nothing
            return []
        seen = seen | {id(node)}
        out = []
        for alt in node.alts:
            out += _value(alt, rest, ch, seen)
        return out
    if isinstance(node, Obj):
        return [((("O", node, 0, "open"), rest), 0)] if ch == "{" else []
    if isinstance(node, Arr):
        return [((("A", node, 0, "open"), rest), 0)] if ch == "[" else []
    if isinstance(node, Str):
        return [((("S", node, 0, "", ""), rest), 0)] if ch == '"' else []
    if isinstance(node, Rx):
        return _extend(("R", node.pattern, ""), rest, ch)
    if isinstance(node, Num):
        return _extend(("N", node, ""), rest, ch)
    if isinstance(node, Lit):
        return _extend(("L", node.options, ""), rest, ch)
    return []


def _extend(frame, rest, ch: str) -> list:
    """A number, literal or pattern frame with one more character, if that keeps it a prefix of one."""
    if frame[0] == "R":
        text = frame[2] + ch
        return [((("R", frame[1], text), rest), 0)] if frame[1].fullmatch(text, partial=True) else []
    if frame[0] == "N":
        text = frame[2] + ch
        ok = ch not in _WS and frame[1].prefix(text)
        return [((("N", frame[1], text), rest), 0)] if ok else []
    typed = frame[2] + ch
    options = tuple(o for o in frame[1] if o.startswith(typed))
    return [((("L", options, typed), rest), 0)] if options else []


def _string(frame, rest, ch: str) -> list:
    _, node, length, esc, value = frame  # value: the decoded characters so far (kept only with a pattern)
    if esc:
        after = _escape_step(esc, ch)
        if after is None or (node.pattern is not None and after == "u"):  # (no \\u escapes under a pattern)
            return []
        if after == "" and node.pattern is not None:  # the escape is over: its character joins the value
            value += _unescape(esc[1:] + ch if esc == "\\" else esc + ch)
            if not node.pattern.fullmatch(value, partial=True):
                return []
        return [((("S", node, length, after, value), rest), 0)]
    if ch == '"':
        if length < node.min:
            return []
        if node.pattern is not None:
            m = node.pattern.fullmatch(value, partial=True)
            if m is None or m.partial:
                return []
        return [(rest, 0)]
    if ord(ch) < 0x20 or (node.max is not None and length >= node.max):
        return []  # control characters must be escaped; a full string takes no more characters
    if ch == "\\":  # under a pattern, only if some escaped character could come next
        if node.pattern is not None and not any(
            node.pattern.fullmatch(value + c, partial=True) for c in _ESCAPED
        ):
            return []
        return [((("S", node, length + 1, "\\", value), rest), 0)]
    if node.pattern is not None:
        value += ch
        if not node.pattern.fullmatch(value, partial=True):
            return []
    return [((("S", node, length + 1, "", value), rest), 0)]


_ESCAPED = '"\\/\b\f\n\r\t'
"""The characters of the short escapes (a string with a pattern uses those only: whether some \\uXXXX could continue
the value cannot be told a digit at a time)."""


def _unescape(seq: str) -> str:
    """The character of an escape sequence, without its backslash ("n", "u00e9", ...)."""
    if seq[0] == "u":
        return chr(int(seq[1:], 16))
    return {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}.get(seq, seq)


def _escape_step(esc: str, ch: str) -> str | None:
    """The escape state after `ch` ("" when the escape is over); None if `ch` cannot continue it.

    States: "\\" after a backslash; "u" and the hex digits so far; "H", "H\\", "Hu"... the same for the low half
    that must follow a high surrogate (\\ud800 to \\udbff): a lone surrogate is valid JSON to Python but not to
    stricter parsers (pydantic's, Rust's), so none is generated."""
    if esc == "\\":
        if ch == "u":
            return "u"
        return "" if ch in '"\\/bfnrt' else None
    if esc == "H":  # a high surrogate's low half: its backslash, then its u
        return "H\\" if ch == "\\" else None
    if esc == "H\\":
        return "Hu" if ch == "u" else None
    if ch not in _HEX:  # esc is "u" (or "Hu") plus the hex digits so far
        return None
    low = esc.startswith("H")
    digits = esc[2:] if low else esc[1:]
    if len(digits) == 1 and digits in "dD":  # the surrogates: d800 to dbff high, dc00 to dfff low
        if low != (ch in "cdefCDEF"):
            return None  # the low half must come after a high one, and only there
    elif len(digits) == 0 and low and ch not in "dD":
        return None
    if len(digits) < 3:
        return esc + ch
    high = not low and digits[0] in "dD" and digits[1] in "89abAB"
    return "H" if high else ""


def _allowed(node: Obj, i: int) -> range:
    """The property indices that may come next, from i: up to and including the first required one."""
    j = i
    while j < len(node.props) and not node.props[j][2]:
        j += 1
    return range(i, min(j + 1, len(node.props)))


def _object(frame, rest, ch: str) -> list:
    _, node, i, stage = frame
    free = not node.props
    rest_optional = free or all(not node.props[j][2] for j in range(i, len(node.props)))
    closes = rest_optional and stage in ("open", "comma")
    if ch == "}":
        return [(rest, 0)] if closes else []
    if ch == "," and stage == "comma":
        more = node.extra is not None if free else bool(_allowed(node, i))
        return [((("O", node, i, "next"), rest), 0)] if more else []
    if ch == '"' and stage in ("open", "next"):
        if free:
            return [((("K", node, -1, "", ""), rest), 0)] if node.extra is not None else []
        return [((("K", node, i, "", ""), rest), 0)] if _allowed(node, i) else []
    return []


def _key(frame, rest, ch: str) -> list:
    _, node, i, typed, esc = frame
    if i < 0:  # any key: a string
        if esc:
            esc = _escape_step(esc, ch)
            return [] if esc is None else [((("K", node, -1, "", esc), rest), 0)]
        if ch == '"':
            return [((("C", node, -1), rest), 0)]
        if ord(ch) < 0x20:
            return []
        return [((("K", node, -1, "", "\\" if ch == "\\" else ""), rest), 0)]
    allowed = _allowed(node, i)
    escaped = (len(typed) - len(typed.rstrip("\\"))) % 2 == 1  # after an odd run of backslashes
    if ch == '"' and not escaped:
        return [((("C", node, j), rest), 0) for j in allowed if node.props[j][0] == typed]
    typed += ch
    if not any(node.props[j][0].startswith(typed) for j in allowed):
        return []
    return [((("K", node, i, typed, ""), rest), 0)]


def _array(frame, rest, ch: str) -> list:
    _, node, count, stage = frame
    if ch == "]":
        return [(rest, 0)] if stage in ("open", "comma") and count >= node.min else []
    if ch == ",":
        ok = stage == "comma" and (node.max is None or count < node.max)
        return [((("A", node, count, "next"), rest), 0)] if ok else []
    if stage in ("open", "next") and (node.max is None or count < node.max):
        return _value(node.items, (("A", node, count + 1, "comma"), rest), ch, set())
    return []


__all__ = ["MAX_ALTERNATIVES", "Matcher"]
