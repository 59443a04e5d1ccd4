"""Structured output's automaton (`lorakit.serve.schema`) against the reference validator `jsonschema`: random
walks through the automaton end in documents the validator accepts; documents the schema allows (in the shape we
generate) are accepted and complete exactly at their end; documents it rejects are refused. Regular expressions,
choices, the schemas we refuse, pydantic's and the formats: tests/test_serve_schema_compile.py."""

from __future__ import annotations

import json
import random
from datetime import datetime, time, timedelta

import jsonschema
import pydantic
import pytest

from lorakit.serve.matcher import Matcher
from lorakit.serve.schema import (
    MAX_SPACE,
    compile_schema,
)

ALPHABET = list(
    '{}[]",:-.0123456789eE+ tfnrulasxyzé\\/buTZ@ABCDPYMWHS?#='
)  # what JSON is made of, some letters
FORMATS = ("date", "time", "date-time", "uuid", "email", "ipv4", "ipv6", "hostname", "duration", "uri")
# (the default checker also checks draft 3's "time"; this one checks "hostname" with fqdn, "duration" with
# isoduration, "ipv6" with ipaddress: test extras)
CHECKER = jsonschema.Draft202012Validator.FORMAT_CHECKER

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer"},
        "email": {"type": ["string", "null"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b", 3, None]}, "minItems": 1, "maxItems": 3},
        "score": {"type": "number"},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}

TREE = {  # recursive, through "#"
    "type": "object",
    "properties": {
        "v": {"type": "integer"},
        "kids": {"type": "array", "items": {"$ref": "#"}, "maxItems": 2},
    },
    "required": ["v"],
}

DEFS = {  # as pydantic writes nested models
    "$defs": {
        "Point": {
            "properties": {"x": {"title": "X", "type": "number"}, "y": {"title": "Y", "type": "number"}},
            "required": ["x", "y"],
            "title": "Point",
            "type": "object",
        },
        "Kind": {"enum": ["line", "polygon"], "title": "Kind", "type": "string"},
    },
    "properties": {
        "kind": {"$ref": "#/$defs/Kind"},
        "points": {"items": {"$ref": "#/$defs/Point"}, "title": "Points", "type": "array"},
        "label": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None, "title": "Label"},
    },
    "required": ["kind", "points"],
    "title": "Shape",
    "type": "object",
}

SCHEMAS = {
    "person": PERSON,
    "tree": TREE,
    "defs": DEFS,
    "any object": {"type": "object"},
    "free values": {"type": "object", "additionalProperties": {"type": "integer"}},
    "top-level array": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 4},
    "top-level number": {"type": "number"},
    "const": {"const": {"a": [1, "x"]}},
    "empty object only": {"type": "object", "additionalProperties": False},
    "one of": {"oneOf": [{"type": "integer"}, {"type": "object", "properties": {"k": {"type": "string"}}}]},
    "all of one": {  # as pydantic 1 wrote a nested model with a description
        "type": "object",
        "properties": {"owner": {"allOf": [{"$ref": "#/definitions/P"}], "description": "who"}},
        "required": ["owner"],
        "definitions": {"P": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}},
    },
    "escaped key": {
        "type": "object",
        "properties": {'q"uo\\te': {"type": "integer"}},
        "required": ['q"uo\\te'],
    },
    "patterns": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{2}-\\d{3}$"},
            "word": {"type": "string", "pattern": "b"},  # unanchored: anywhere in the value
            "esc": {"type": "string", "pattern": "^\\\\[a-c]$"},  # a backslash, then a letter
        },
        "required": ["code", "word", "esc"],
    },
    "formats": {
        "type": "object",
        "properties": {f: {"type": "string", "format": f} for f in FORMATS},
        "required": list(FORMATS),
    },
    "bounds": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "temp": {"type": "number", "minimum": -273.15, "maximum": 100},
            "neg": {"type": "integer", "minimum": -50, "maximum": -10},
            "pick": {"type": "integer", "minimum": 7, "maximum": 7},
            "big": {"type": "integer", "minimum": 1000},
            "below": {"type": "number", "exclusiveMaximum": -2.5},
            "half": {"type": "number", "multipleOf": 0.5, "minimum": -3, "exclusiveMaximum": 100},
            "dozen": {"type": "integer", "multipleOf": 12, "exclusiveMinimum": 0},
        },
        "required": ["age", "score", "temp", "neg", "pick", "big", "below"],
    },
}


def _walk(schema, rng: random.Random, steps: int = 400) -> str | None:
    """A random text the automaton allows, character by character, ending where it is complete (None if it did
    not complete within `steps` characters)."""
    state = Matcher(compile_schema(schema))
    alphabet = sorted(set(ALPHABET) | set(json.dumps(schema, ensure_ascii=False)))  # keys and enum values too
    text = ""
    for _ in range(steps):
        if state.complete and (state.finished or rng.random() < 0.3):
            return text
        options = [ch for ch in alphabet if state.advance(ch) is not None]
        assert options, f"a dead end after {text!r}: no character continues it"
        weights = [6 if ch in '"}]' else 1 for ch in options]  # close things, so walks end
        ch = rng.choices(options, weights)[0]
        state, text = state.advance(ch), text + ch
    return None


@pytest.mark.parametrize("name", SCHEMAS)
def test_random_walks_end_in_documents_the_validator_accepts(name):
    assert {"hostname", "duration", "ipv6"} <= set(CHECKER.checkers)  # else it would pass them unchecked
    schema = SCHEMAS[name]
    rng = random.Random(sum(map(ord, name)))  # (not hash(): it differs between processes)
    done = 0
    for _ in range(150):
        text = _walk(schema, rng)
        if text is None:
            continue
        doc = json.loads(text)
        jsonschema.validate(doc, schema, format_checker=CHECKER)  # raises if we generated what it rejects
        if name == "formats":  # (jsonschema checks RFC 3339 times only with a package we do not need)
            datetime.fromisoformat(doc["date-time"])
            time.fromisoformat(doc["time"])
            pydantic.TypeAdapter(pydantic.HttpUrl).validate_python(doc["uri"])  # (jsonschema: a GPL package)
            pydantic.TypeAdapter(timedelta).validate_python(doc["duration"])
        done += 1
    assert done >= 20, done  # enough walks completed for the check to mean something


DOCS = [
    ("person", {"name": "Ada", "age": 36, "tags": ["a", None]}),
    ("person", {"name": "Ada Lovelace", "age": -1, "email": None, "tags": [3], "score": 1.5e-3, "ok": True}),
    ("person", {"name": "Al", "age": 0, "email": "al@x.org", "tags": ["b", "b", "a"], "ok": False}),
    ("tree", {"v": 1, "kids": [{"v": 2}, {"v": 3, "kids": [{"v": 4, "kids": []}]}]}),
    ("defs", {"kind": "line", "points": [{"x": 0, "y": 1.5}, {"x": -2e3, "y": 0}], "label": None}),
    ("defs", {"kind": "polygon", "points": []}),
    ("free values", {"a": 1, "": -3, "é": 0}),
    ("top-level array", ["", "abc", "é☃"]),
    ("const", {"a": [1, "x"]}),
    ("empty object only", {}),
    ("one of", 12),
    ("one of", {"k": "v"}),
    ("escaped key", {'q"uo\\te': 5}),
    ("patterns", {"code": "AB-123", "word": "xaby", "esc": "\\b"}),
    (
        "formats",
        {
            "date": "2024-02-28",
            "time": "12:30:00Z",
            "date-time": "2024-12-04T19:00:00.5+01:00",
            "uuid": "123e4567-e89b-12d3-a456-426614174000",
            "email": "a.b@example.org",
            "ipv4": "192.168.0.1",
            "ipv6": "2001:db8::8a2e:370:7334",
            "hostname": "mail.example.com",
            "duration": "P1Y2M3DT4H5M6S",
            "uri": "https://example.com:8080/a/b.html?q=1&r=two#top",
        },
    ),
    (
        "bounds",
        {
            "age": 150,
            "score": 1,
            "temp": -273.15,
            "neg": -10,
            "pick": 7,
            "big": 123456,
            "below": -2.51,
            "half": -3,
        },
    ),
    (
        "bounds",
        {
            "age": 0,
            "score": 0.001,
            "temp": 99.99,
            "neg": -50,
            "pick": 7,
            "big": 1000,
            "below": -1000,
            "half": 99.5,
        },
    ),
    (
        "bounds",
        {"age": 7, "score": 0.5, "temp": 0, "neg": -20, "pick": 7, "big": 1001, "below": -3, "dozen": 144},
    ),
]


@pytest.mark.parametrize("name, doc", DOCS)
def test_allowed_documents_are_accepted_and_complete_exactly_at_their_end(name, doc):
    schema = SCHEMAS[name]
    jsonschema.validate(doc, schema)  # (the test's own premise)
    compact = name == "const"  # enum and const values are matched as written compactly
    texts = [json.dumps(doc, ensure_ascii=False, separators=(",", ":"))]
    if not compact:
        texts += [json.dumps(doc), json.dumps(doc, ensure_ascii=False, indent=1)]
    for text in texts:
        if "\n" + " " * MAX_SPACE in text:
            continue  # deeper indentation than the whitespace cap allows
        state = Matcher(compile_schema(schema))
        for i, ch in enumerate(text):
            assert not (state.complete and state.finished), f"finished before the end, at {i}: {text!r}"
            state = state.advance(ch)
            assert state is not None, f"refused at {i} ({text[: i + 1]!r})"
        assert state.complete, text


BELOW = '{"age": 1, "score": 1, "temp": 1, "neg": -10, "pick": 7, "big": 1000, "below": -3, '
REJECTED = [
    ("person", '{"age": 3', 2),  # "name" is required and comes first
    ("person", '{"name": "", ', 10),  # minLength 1
    ("person", '{"name": "abcdefghijklm', 22),  # maxLength 12
    ("person", '{"name": "A", "age": 1.5', 22),  # an integer
    ("person", '{"name": "A", "age": 1, "tags": []', 33),  # minItems 1
    ("person", '{"name": "A", "age": 1, "tags": ["c"', 34),  # not in the enum
    ("person", '{"name": "A", "age": 1, "tags": [3, 3, 3, 3', 40),  # maxItems 3
    ("person", '{"name": "A", "age": 1, "tags": [3], "extra', 38),  # no other keys
    ("person", '{"name": "A", "age": 1, "tags": [3]}', None),  # fine: the optional ones may be left out
    ("person", '{"name": "A", "age": 1}', 22),  # "tags" is required
    ("person", '{"name": 5', 9),
    ("tree", '{"v": 1, "kids": [{"v": 2}, {"v": 3}, {', 36),  # maxItems 2, deeper too
    ("defs", '{"kind": "circle', 10),
    ("defs", '{"kind": "line", "points": [{"y"', 30),  # x comes first and is required
    ("empty object only", '{"', 1),
    ("top-level number", "1 ", 1),  # nothing after a whole document
    ("one of", "[", 0),
    ("patterns", '{"code": "A1', 11),
    ("patterns", '{"code": "AB-123", "word": "xy"', 30),  # no "b" in it
    ("patterns", '{"code": "AB-123", "word": "ab", "esc": "\\\\d', 43),
    ("formats", '{"date": "2024-02-30', 18),  # February has no 30th
    ("formats", '{"date": "2024-13', 16),
    ("formats", '{"date": "2024-12-04", "time": "25', 33),
    ("formats", '{"date": "2024-12-04", "time": "12:00:00"', 40),  # RFC 3339: a time has its offset
    ("bounds", '{"age": 151', 10),  # at most 150
    ("bounds", '{"age": -', 8),  # at least 0 (and never -0)
    ("bounds", '{"age": 1, "score": 0,', 21),  # more than 0 ("0" may still become 0.5)
    ("bounds", '{"age": 1, "score": 1.5', 22),  # at most 1 ("1." may still become 1.0)
    ("bounds", '{"age": 1, "score": 2', 20),
    ("bounds", '{"age": 1, "score": 1, "temp": -273.16', 37),
    ("bounds", '{"age": 1, "score": 1, "temp": 1e', 32),  # no exponent under bounds
    ("bounds", '{"age": 1, "score": 1, "temp": 1, "neg": -9', 42),  # -9 and -90 to -99 are out
    ("bounds", '{"age": 1, "score": 1, "temp": 1, "neg": -10, "pick": 70', 55),
    (
        "bounds",
        '{"age": 1, "score": 1, "temp": 1, "neg": -10, "pick": 7, "big": 999,',
        67,
    ),  # ("999" may grow)
    ("bounds", '{"age": 1, "score": 1, "temp": 1, "neg": -10, "pick": 7, "big": 1000, "below": -2.5}', 83),
    ("bounds", BELOW + '"half": 0.3', 93),  # no multiple of 0.5 in [0.3, 0.4)
    ("bounds", BELOW + '"half": 1.5, "dozen": 0', 105),  # more than 0
    ("bounds", BELOW + '"dozen": 132}', None),  # 11 dozen
]


@pytest.mark.parametrize("name, text, bad_at", REJECTED)
def test_what_the_schema_rejects_is_refused_where_it_goes_wrong(name, text, bad_at):
    state = Matcher(compile_schema(SCHEMAS[name]))
    for i, ch in enumerate(text):
        nxt = state.advance(ch)
        if nxt is None:
            assert i == bad_at, (text, i, text[: i + 1])
            return
        state = nxt
    assert bad_at is None, (text, "accepted whole")
    assert state.complete
