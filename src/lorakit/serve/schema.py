"""Structured output: JSON Schemas (and lists of choices) compiled to a character-level automaton that accepts
exactly the prefixes of the texts they allow, for `lorakit.serve.guide` to keep a row's output one of them.

    grammar = compile_schema({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]})
    state = Matcher(grammar)
    state = state.advance('{"name": "Ada')     # None if the text cannot start an allowed document
    state.complete                             # the text so far is a whole document

A schema compiles to nodes: objects (their properties in the schema's order; a property not required may be left
out; no other keys are generated), arrays (minItems, maxItems), strings (minLength, maxLength), numbers and
integers, literals (enum, const, true/false/null) and alternatives (anyOf, oneOf, a list of types), with `$ref`
to `#`, `#/$defs/...` and `#/definitions/...` (recursion included). Keywords that only annotate (title,
description, default, examples, format, ...) are ignored; any other keyword is refused with a `SchemaError` that
names it and where it is, rather than generating output the schema would reject. Everything generated validates:
the automaton produces a subset of what the schema allows (no extra properties, keys in the schema's order, the
canonical spelling of keys and enum values).

The automaton follows all alternatives at once (a set of parser stacks, each an immutable linked list of frames),
so advancing and copying are cheap, and `anyOf` costs nothing until a character tells the branches apart.
Outside strings at most `MAX_SPACE` whitespace characters may follow one another (none in a list of choices), so
that a model cannot pad its answer with blank lines.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

MAX_SPACE = 4
"""Most whitespace characters in a row outside strings."""
MAX_ALTERNATIVES = 64
"""Most parser stacks followed at once (more are dropped: what is generated stays valid, only less varied)."""
MAX_NODES = 4096
"""Most schema nodes one schema may compile to."""
MAX_CHOICES = 1024
"""Most values of one enum, or choices of one guided_choice."""

_WS = " \t\n\r"
_HEX = frozenset("0123456789abcdefABCDEF")
_NUMBER = re.compile(r"-?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*|(?:\.[0-9]+)?[eE][+-]?[0-9]*)?)?")
_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]*)?")
r"""The prefixes of a JSON number, -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?, cut anywhere; of an integer."""

ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$schema", "$id", "$comment", "format", "readOnly"}
    | {"writeOnly", "deprecated", "contentMediaType", "contentEncoding"}
)
"""Keywords that constrain nothing we generate: ignored (`format` is an annotation by default in JSON Schema;
those in FORMATS are enforced all the same)."""
KEYWORDS = frozenset(
    {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "minLength"}
    | {"maxLength", "pattern", "enum", "const", "anyOf", "oneOf", "$ref", "$defs", "definitions"}
)
"""The keywords enforced."""
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


class SchemaError(ValueError):
    """A schema that cannot be compiled: one line naming the keyword and where it is (a JSON pointer)."""


# -- nodes --------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Obj:
    props: tuple[tuple[str, Any, bool], ...] = ()  # (key as written between the quotes, value node, required)
    extra: Any = None  # with no properties: the value node of any key (None: no keys at all)


@dataclass(eq=False)
class Arr:
    items: Any
    min: int = 0
    max: int | None = None


@dataclass(eq=False)
class Str:
    min: int = 0
    max: int | None = None
    pattern: Any = None  # a compiled `regex` pattern the decoded value must fullmatch (pattern, format)


@dataclass(eq=False)
class Rx:
    pattern: Any  # guided_regex: the whole output, as is, must fullmatch this compiled `regex` pattern


@dataclass(eq=False)
class Num:
    integer: bool = False


@dataclass(eq=False)
class Lit:
    options: tuple[str, ...]  # the texts, written out (JSON for enum and const, raw for choices)


@dataclass(eq=False)
class AnyOf:
    alts: list = field(default_factory=list)


@dataclass(eq=False)
class Ref:
    target: str
    defs: dict

    def resolve(self):
        return self.defs[self.target]


def _any() -> AnyOf:
    """Any JSON value."""
    node = AnyOf()
    node.alts += [Obj(extra=node), Arr(node), Str(), Num(), Lit(("true", "false", "null"))]
    return node


ANY = _any()


@dataclass(frozen=True, eq=False)
class Grammar:
    root: Any
    space: int = MAX_SPACE  # most whitespace characters in a row outside strings


JSON_OBJECT = Grammar(Obj(extra=ANY))
"""JSON mode: any JSON object."""


# -- compiling ----------------------------------------------------------------------------------------------------


def compile_schema(schema: Any) -> Grammar:
    """The grammar of the documents `schema` (a JSON Schema, as parsed JSON) allows; SchemaError if it uses a
    keyword we cannot enforce, is malformed, or allows nothing."""
    if isinstance(schema, bool):
        if not schema:
            raise SchemaError("the schema is false: it allows nothing")
        return Grammar(ANY)
    if not isinstance(schema, dict):
        raise SchemaError(f"a schema must be a JSON object, got {type(schema).__name__}")
    compiler = _Compiler(schema)
    root = compiler.node(schema, "#")
    while len(compiler.defs) < len(compiler.pending):  # $ref targets, and the targets of their $refs
        name = next(n for n in compiler.pending if n not in compiler.defs)
        sub, where = compiler.pending[name]
        compiler.defs[name] = compiler.node(sub, where)
    return Grammar(root)


def compile_choices(choices: Any) -> Grammar:
    """The grammar of exactly one of `choices` (a list of strings), written as is (vLLM's guided_choice)."""
    if (
        not isinstance(choices, list)
        or not choices
        or len(choices) > MAX_CHOICES
        or not all(isinstance(c, str) and c for c in choices)
    ):
        raise SchemaError(f"choices must be a list of 1 to {MAX_CHOICES} non-empty strings")
    return Grammar(Lit(tuple(dict.fromkeys(choices))), space=0)


class _Compiler:
    def __init__(self, root: dict) -> None:
        self.root = root
        self.defs: dict[str, Any] = {}
        self.pending: dict[str, tuple[Any, str]] = {}  # $ref targets still to compile
        self.count = 0

    def node(self, s: Any, where: str, depth: int = 0):
        self.count += 1
        if self.count > MAX_NODES:
            raise SchemaError(f"the schema is too large (more than {MAX_NODES} subschemas)")
        if depth > 64:
            raise SchemaError(f"the schema nests more than 64 levels deep at {where}")
        if s is True or s == {}:
            return ANY
        if s is False:
            raise SchemaError(f"the schema at {where} is false: it allows nothing")
        if not isinstance(s, dict):
            raise SchemaError(f"the schema at {where} must be a JSON object or a boolean, got {s!r}"[:200])
        unknown = sorted(k for k in s if k not in KEYWORDS and k not in ANNOTATIONS)
        if unknown:
            raise SchemaError(
                f"unsupported keyword {unknown[0]!r} at {where} (supported: {', '.join(sorted(KEYWORDS))})"
            )
        if "$ref" in s:
            return self._ref(s, where)
        for key in ("anyOf", "oneOf"):
            if key in s:
                return self._alternatives(s, key, where, depth)
        if "const" in s:
            return Lit((_dumps(s["const"]),))
        if "enum" in s:
            values = s["enum"]
            if not isinstance(values, list) or not values or len(values) > MAX_CHOICES:
                raise SchemaError(f"'enum' at {where} must be a list of 1 to {MAX_CHOICES} values")
            return Lit(tuple(dict.fromkeys(_dumps(v) for v in values)))
        kind = s.get("type")
        if isinstance(kind, list):
            if not kind or not all(k in TYPES for k in kind):
                raise SchemaError(f"'type' at {where} must be one of {', '.join(TYPES)} or a list of them")
            alts = [self._typed(s, k, where, depth) for k in dict.fromkeys(kind)]
            return alts[0] if len(alts) == 1 else AnyOf(alts)
        if kind is None:  # no type: what the other keywords say, else anything
            kind = "object" if "properties" in s else "array" if "items" in s else None
            if kind is None:
                return ANY
        return self._typed(s, kind, where, depth)

    def _typed(self, s: dict, kind: Any, where: str, depth: int):
        if kind == "object":
            return self._object(s, where, depth)
        if kind == "array":
            items = s.get("items", True)
            if isinstance(items, list):
                raise SchemaError(
                    f"'items' at {where} must be one schema (a list of schemas is not supported)"
                )
            lo, hi = _bounds(s, "minItems", "maxItems", where)
            node = self.node(items, f"{where}/items", depth + 1) if hi != 0 else ANY
            return Arr(node, lo, hi)
        if kind == "string":
            return Str(*_bounds(s, "minLength", "maxLength", where), _string_pattern(s, where))
        if kind in ("number", "integer"):
            return Num(integer=kind == "integer")
        if kind == "boolean":
            return Lit(("true", "false"))
        if kind == "null":
            return Lit(("null",))
        raise SchemaError(f"'type' at {where} must be one of {', '.join(TYPES)}, got {kind!r}"[:200])

    def _object(self, s: dict, where: str, depth: int) -> Obj:
        props = s.get("properties", {})
        required = s.get("required", [])
        if not isinstance(props, dict):
            raise SchemaError(f"'properties' at {where} must be an object")
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise SchemaError(f"'required' at {where} must be a list of property names")
        missing = [r for r in required if r not in props]
        if missing:
            raise SchemaError(f"required property {missing[0]!r} at {where} is not among its 'properties'")
        if props:
            return Obj(
                tuple(
                    (
                        _dumps(name)[1:-1],
                        self.node(sub, f"{where}/properties/{_escape(name)}", depth + 1),
                        name in required,
                    )
                    for name, sub in props.items()
                )
            )
        extra = s.get("additionalProperties", True)
        if extra is False:
            return Obj()
        return Obj(extra=self.node(extra, f"{where}/additionalProperties", depth + 1))

    def _alternatives(self, s: dict, key: str, where: str, depth: int):
        others = sorted(k for k in s if k in KEYWORDS and k not in (key, "$defs", "definitions"))
        if others:
            raise SchemaError(f"{key!r} at {where} with {others[0]!r} beside it is not supported")
        alts = s[key]
        if not isinstance(alts, list) or not alts:
            raise SchemaError(f"{key!r} at {where} must be a non-empty list of schemas")
        nodes = [self.node(a, f"{where}/{key}/{i}", depth + 1) for i, a in enumerate(alts)]
        return nodes[0] if len(nodes) == 1 else AnyOf(nodes)

    def _ref(self, s: dict, where: str) -> Ref:
        ref = s["$ref"]
        others = sorted(k for k in s if k in KEYWORDS and k not in ("$ref", "$defs", "definitions"))
        if others:
            raise SchemaError(f"'$ref' at {where} with {others[0]!r} beside it is not supported")
        if not isinstance(ref, str):
            raise SchemaError(f"'$ref' at {where} must be a string")
        if ref == "#":
            target = self.root
        else:
            m = re.fullmatch(r"#/(\$defs|definitions)/([^/]+)", ref)
            defs = self.root.get(m.group(1)) if m else None
            name = m.group(2).replace("~1", "/").replace("~0", "~") if m else None
            if not isinstance(defs, dict) or name not in defs:
                raise SchemaError(
                    f"'$ref' {ref!r} at {where} does not name a schema of this one (#, #/$defs/NAME or "
                    "#/definitions/NAME)"[:300]
                )
            target = defs[name]
        if ref not in self.defs and ref not in self.pending:
            self.pending[ref] = (target, ref)
        return Ref(ref, self.defs)


_DATE = (
    r"\d{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12]\d|3[01])|(?:0[469]|11)-(?:0[1-9]|[12]\d|30)"
    r"|02-(?:0[1-9]|1\d|2[0-8]))"
)
"""A calendar date: each month's days (February's 29th never: no leap years in a regular expression)."""
FORMATS = {
    "date": _DATE,
    "time": r"(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d{1,6})?(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)",
    "date-time": _DATE
    + r"T(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d{1,6})?(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)",
    "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    "email": r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){1,8}",
    "ipv4": r"(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)",
}
"""String formats enforced, as the patterns their values fullmatch (RFC 3339 for dates and times, a time with
its offset); any other format is an annotation."""


def compile_regex(pattern: Any, where: str = "guided_regex") -> Any:
    """`pattern` compiled with the `regex` module (which can tell whether a prefix may still match); SchemaError
    if it is not a regular expression."""
    import regex

    if not isinstance(pattern, str) or not pattern or len(pattern) > 4096:
        raise SchemaError(f"{where} must be a regular expression of 1 to 4096 characters")
    try:
        return regex.compile(pattern, regex.V0)
    except regex.error as e:
        raise SchemaError(f"{where} is not a regular expression: {e}") from None


def compile_pattern(pattern: Any) -> Grammar:
    """The grammar of texts `pattern` fullmatches, written as is (vLLM's guided_regex)."""
    return Grammar(Rx(compile_regex(pattern)), space=0)


def _string_pattern(s: dict, where: str) -> Any:
    """What a string's value must fullmatch: its `pattern` (JSON Schema's is a search: unless anchored at both
    ends it may match anywhere), else the pattern of a known `format`; None if neither."""
    pattern = s.get("pattern")
    if pattern is not None and ("minLength" in s or "maxLength" in s):
        raise SchemaError(
            f"'pattern' with 'minLength' or 'maxLength' at {where} is not supported (the two could leave no way to "
            "end the string): put the length into the pattern, as in ^[a-z]{1,8}$"
        )
    if pattern is None:
        known = FORMATS.get(s.get("format"))
        return compile_regex(known) if known else None
    if not isinstance(pattern, str):
        raise SchemaError(f"'pattern' at {where} must be a string")
    anchored = pattern.startswith("^") and pattern.endswith("$") and not pattern.endswith("\\$")
    body = pattern[1:-1] if anchored else f"(?s:.*?(?:{pattern}).*)"
    return compile_regex(body, f"'pattern' at {where}")


def _bounds(s: dict, lo_key: str, hi_key: str, where: str) -> tuple[int, int | None]:
    lo, hi = s.get(lo_key, 0), s.get(hi_key)
    for key, value in ((lo_key, lo), (hi_key, hi)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise SchemaError(f"{key!r} at {where} must be an integer >= 0, got {value!r}")
    if hi is not None and lo > hi:
        raise SchemaError(f"{lo_key!r} {lo} is more than {hi_key!r} {hi} at {where}: nothing fits")
    return lo, hi


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


# -- the automaton -------------------------------------------------------------------------------------------------
#
# A stack is None (the document is whole) or (frame, rest). Frames:
#   ("V", node)                       a value of `node` comes next
#   ("O", node, i, stage)             in an object; properties from index i on may come; stage: open (after "{"),
#                                     comma (after a member), next (after ",")
#   ("K", node, i, typed, esc)        in a key; i >= 0: one of the properties from i on, `typed` so far;
#                                     i == -1: any key (esc: the escape state, as in strings)
#   ("C", node, j)                    a colon comes next, then the value of property j (-1: of any key)
#   ("A", node, count, stage)         in an array holding `count` values; stage: open, comma, next
#   ("S", node, length, esc, value)   in a string value of `length` characters so far (`value`: their decoded
#                                     text, kept only when the string has a pattern)
#   ("R", pattern, text)              in a text that a regular expression must fullmatch (guided_regex)
#   ("N", integer, text)              in a number
#   ("L", options, typed)             in a literal: `typed` so far, `options` the texts it may still become


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
        return frame[1] and frame[2].lstrip("-") == "0"  # an integer 0: no leading zeros
    return frame[0] == "L" and frame[1] == (frame[2],)


def _value_done(frame) -> bool:
    """Whether a number, literal or pattern frame holds a whole value (it may end at the next character)."""
    if frame[0] == "R":
        m = frame[1].fullmatch(frame[2], partial=True)
        return m is not None and not m.partial
    if frame[0] == "N":
        return frame[2][-1:].isdigit()
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
        return _extend(("N", node.integer, ""), rest, ch)
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
        ok = (_INTEGER if frame[1] else _NUMBER).fullmatch(text) is not None and ch not in _WS
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


__all__ = [
    "ANY",
    "JSON_OBJECT",
    "MAX_SPACE",
    "Grammar",
    "Matcher",
    "SchemaError",
    "compile_choices",
    "compile_pattern",
    "compile_schema",
]
