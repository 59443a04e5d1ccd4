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
import re
from dataclasses import dataclass, field
from typing import Any

from lorakit.serve.formats import FORMATS
from lorakit.serve.numbers import Num
from lorakit.serve.schema_keywords import (
    NUMERIC,
    SchemaError,
    bounds,
    compile_regex,
    format_lengths,
    number,
    string_pattern,
)

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
            lo, hi = bounds(s, "minItems", "maxItems", where)
            node = self.node(items, f"{where}/items", depth + 1) if hi != 0 else ANY
            return Arr(node, lo, hi)
        if kind == "string":
            lo, hi = bounds(s, "minLength", "maxLength", where)
            if s.get("pattern") is None and s.get("format") in FORMATS:
                lo, hi = format_lengths(s["format"], lo, hi, where)
            return Str(lo, hi, string_pattern(s, where))
        if kind in ("number", "integer"):
            return number(s, kind == "integer", where)
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


def compile_pattern(pattern: Any) -> Grammar:
    """The grammar of texts `pattern` fullmatches, written as is (vLLM's guided_regex)."""
    return Grammar(Rx(compile_regex(pattern)), space=0)


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
