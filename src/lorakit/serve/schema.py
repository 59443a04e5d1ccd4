"""Structured output: JSON Schemas (and lists of choices, regular expressions) compiled to grammars, whose
automaton (`lorakit.serve.matcher.Matcher`) accepts exactly the prefixes of the texts they allow, for
`lorakit.serve.guide` to keep a row's output one of them.

    grammar = compile_schema({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]})
    state = Matcher(grammar).advance('{"name": "Ada')   # None if the text cannot start an allowed document

A schema compiles to nodes: objects (their properties in the schema's order; a property not required may be left
out; no other keys are generated), arrays (minItems, maxItems), strings (minLength, maxLength, pattern, some
formats), numbers and integers (minimum, maximum, exclusiveMinimum, exclusiveMaximum), literals (enum, const, true/false/null) and alternatives (anyOf, oneOf, a list of types), with `$ref`
to `#`, `#/$defs/...` and `#/definitions/...` (recursion included). Keywords that only annotate (title,
description, default, examples, format, ...) are ignored; any other keyword is refused with a `SchemaError` that
names it and where it is, rather than generating output the schema would reject. Everything generated validates:
the automaton produces a subset of what the schema allows (no extra properties, keys in the schema's order, the
canonical spelling of keys and enum values).

Outside strings at most `MAX_SPACE` whitespace characters may follow one another (none in a list of choices), so
that a model cannot pad its answer with blank lines; they are spaces, tabs and newlines (JSON's carriage return is
never generated).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from lorakit.serve.formats import FORMAT_LENGTHS, FORMATS
from lorakit.serve.numbers import MAX_STEP_DECIMALS, Num, decimals

MAX_SPACE = 4
"""Most whitespace characters in a row outside strings."""
MAX_NODES = 4096
"""Most schema nodes one schema may compile to."""
MAX_CHOICES = 1024
"""Most values of one enum, or choices of one guided_choice."""

ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$schema", "$id", "$comment", "format", "readOnly"}
    | {"writeOnly", "deprecated", "contentMediaType", "contentEncoding"}
)
"""Keywords that constrain nothing we generate: ignored (`format` is an annotation by default in JSON Schema;
those in FORMATS are enforced all the same)."""
KEYWORDS = frozenset(
    {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "minLength"}
    | {"maxLength", "pattern", "enum", "const", "anyOf", "oneOf", "$ref", "$defs", "definitions"}
    | {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "allOf"}
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
        if "allOf" in s:  # one schema, as generators write a $ref with a description: that schema
            parts, others = (
                s["allOf"],
                sorted(k for k in s if k in KEYWORDS and k not in ("allOf", "$defs", "definitions")),
            )
            if not isinstance(parts, list) or len(parts) != 1:
                raise SchemaError(f"'allOf' at {where} with other than one schema is not supported")
            if others:
                raise SchemaError(f"'allOf' at {where} with {others[0]!r} beside it is not supported")
            return self.node(parts[0], f"{where}/allOf/0", depth + 1)
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
            if kind is None and any(k in s for k in NUMERIC):
                kind = "number"  # (the other types ignore the bounds: a number that keeps them is allowed)
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
            lo, hi = _bounds(s, "minLength", "maxLength", where)
            if s.get("pattern") is None and s.get("format") in FORMATS:
                lo, hi = _format_lengths(s["format"], lo, hi, where)
            return Str(lo, hi, _string_pattern(s, where))
        if kind in ("number", "integer"):
            return _number(s, kind == "integer", where)
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


def _format_lengths(fmt: str, lo: int, hi: int | None, where: str) -> tuple[int, int | None]:
    """A known format's minLength and maxLength: none left when every value of the format keeps them (pydantic's
    HttpUrl: 1 to 2083 characters); refused when some would not, as they could leave no way to end the string."""
    shortest, longest = FORMAT_LENGTHS[fmt]
    if lo <= shortest and (hi is None or longest <= hi):
        return 0, None
    given = " and ".join([f"'minLength' {lo}"] * (lo > 0) + [f"'maxLength' {hi}"] * (hi is not None))
    raise SchemaError(
        f"'format' {fmt!r} with {given} at {where} is not supported (its values have {shortest} to {longest} "
        "characters here): leave the lengths out, or use a 'pattern'"
    )


NUMERIC = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


def _number(s: dict, integer: bool, where: str) -> Num:
    """A number or integer within the schema's bounds: the stricter of `minimum` and `exclusiveMinimum` (a number,
    or draft 4's boolean that makes `minimum` exclusive), and likewise above."""
    values = {}
    for key in NUMERIC:
        value = s.get(key)
        if value is None or (isinstance(value, bool) and key.startswith("exclusive")):
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise SchemaError(f"{key!r} at {where} must be a number, got {value!r}"[:200])
        values[key] = Fraction(repr(value)) if isinstance(value, float) else Fraction(value)
    node = Num(integer)
    if "multipleOf" in values:
        step = values["multipleOf"]
        if step <= 0:
            raise SchemaError(f"'multipleOf' at {where} must be more than 0, got {s['multipleOf']!r}"[:200])
        node.step = Fraction(step.numerator) if integer else step  # integers that are multiples of 2.5: of 5
        if not integer and decimals(node.step) > MAX_STEP_DECIMALS:
            given = s["multipleOf"]
            raise SchemaError(
                f"'multipleOf' {given!r} at {where} has more than {MAX_STEP_DECIMALS} decimal places"
            )
    for side, inclusive, exclusive in (
        ("lo", "minimum", "exclusiveMinimum"),
        ("hi", "maximum", "exclusiveMaximum"),
    ):
        flag = s.get(exclusive)
        if isinstance(flag, bool) and flag and inclusive not in values:
            raise SchemaError(f"{exclusive!r} true at {where} needs {inclusive!r} beside it")
        options = [(values[inclusive], flag is True)] if inclusive in values else []
        if exclusive in values:
            options.append((values[exclusive], True))
        if options:  # the stricter one: the higher least value, the lower greatest; open before closed
            sign = 1 if side == "lo" else -1
            bound, is_open = max(options, key=lambda o: (sign * o[0], o[1]))
            setattr(node, side, bound)
            setattr(node, f"{side}_open", is_open)
    if node.bounded and not node.prefix(""):
        given = ", ".join(f"{k!r} {s[k]!r}" for k in NUMERIC if k in s)
        raise SchemaError(
            f"no {'integer' if integer else 'number'} is within {given} at {where}: nothing fits"[:300]
        )
    return node


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


__all__ = [
    "ANY",
    "JSON_OBJECT",
    "MAX_SPACE",
    "Grammar",
    "SchemaError",
    "compile_choices",
    "compile_pattern",
    "compile_schema",
]
