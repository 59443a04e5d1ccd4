"""Structured output beyond the JSON documents of tests/test_serve_schema.py: a regular expression and a list of
choices as grammars, schemas we cannot enforce refused at compile time in one line naming the keyword and where it
is, a pydantic model's schema (pydantic reads back what the automaton allows), and the string formats' lengths
and IPv6's forms."""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta
from ipaddress import IPv6Address

import pydantic
import pytest
from test_serve_schema import FORMATS, _walk

from lorakit.serve.matcher import Matcher
from lorakit.serve.schema import SchemaError, compile_choices, compile_pattern, compile_schema


def test_a_regular_expression_guides_the_whole_text():
    g = compile_pattern(r"(yes|no), because \w+\.")
    assert Matcher(g).advance("yes, because it.").complete
    assert not Matcher(g).advance("no, because").complete  # a prefix: fine so far, not whole
    for text in ("maybe", " yes", "yes,because", "no, because it!"):
        assert Matcher(g).advance(text) is None, text
    with pytest.raises(SchemaError, match="guided_regex is not a regular expression"):
        compile_pattern("(unclosed")


def test_choices_are_exactly_one_of_them():
    g = compile_choices(["yes", "yes please", "no"])
    for text in ("yes", "yes please", "no"):
        state = Matcher(g).advance(text)
        assert state is not None and state.complete
    assert Matcher(g).advance("yes").finished is False  # "yes please" may still come
    assert Matcher(g).advance("no").finished
    for text in (" yes", "ye s", "yes!", "No", "nope"):
        assert Matcher(g).advance(text) is None, text
    assert not Matcher(g).advance("yes p").complete


@pytest.mark.parametrize(
    "schema, needle",
    [
        ({"type": "string", "pattern": "(a"}, "'pattern' at # is not a regular expression"),
        ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "put the length into the pattern"),
        (
            {"type": "string", "format": "uuid", "maxLength": 10},
            "'format' 'uuid' with 'maxLength' 10 at # is not supported (its values have 36 to 36 characters here)",
        ),
        (
            {"type": "string", "format": "hostname", "minLength": 3},
            "'format' 'hostname' with 'minLength' 3 at #",
        ),
        (
            {"properties": {"zip": {"type": "integer", "multipleOf": 0}}},
            "'multipleOf' at #/properties/zip must be more than 0, got 0",
        ),
        ({"type": "number", "multipleOf": -0.5}, "'multipleOf' at # must be more than 0"),
        ({"type": "number", "multipleOf": "5"}, "'multipleOf' at # must be a number"),
        ({"type": "number", "multipleOf": 1e-12}, "'multipleOf' 1e-12 at # has more than 9 decimal places"),
        (
            {"type": "integer", "minimum": 11, "maximum": 19, "multipleOf": 10},
            "no integer is within 'minimum' 11, 'maximum' 19, 'multipleOf' 10 at #: nothing fits",
        ),
        (
            {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 0.5, "multipleOf": 0.5},
            "nothing fits",
        ),
        (
            {"type": "integer", "minimum": 5, "maximum": 3},
            "no integer is within 'minimum' 5, 'maximum' 3 at #",
        ),
        ({"type": "integer", "exclusiveMinimum": 0, "maximum": 0.5}, "nothing fits"),
        ({"type": "number", "maximum": "10"}, "'maximum' at # must be a number"),
        ({"type": "number", "exclusiveMaximum": True}, "'exclusiveMaximum' true at # needs 'maximum'"),
        ({"allOf": [{"type": "string"}, {"maxLength": 3}]}, "'allOf' at # with other than one schema"),
        ({"allOf": [{"type": "string"}], "type": "string"}, "'allOf' at # with 'type' beside it"),
        ({"not": {"type": "string"}}, "unsupported keyword 'not'"),
        ({"type": "integer", "multipleOf": 2, "not": {"const": 4}}, "unsupported keyword 'not'"),
        ({"type": "object", "required": ["a"]}, "required property 'a' at # is not among its 'properties'"),
        ({"type": "string", "minLength": 5, "maxLength": 2}, "nothing fits"),
        ({"type": "array", "maxItems": -1}, "'maxItems' at # must be an integer >= 0"),
        ({"type": "uuid"}, "'type' at # must be one of"),
        ({"type": []}, "'type' at # must be one of"),
        ({"enum": []}, "'enum' at # must be a list of 1 to"),
        ({"anyOf": []}, "'anyOf' at # must be a non-empty list"),
        ({"type": "string", "anyOf": [{"type": "string"}]}, "with 'type' beside it is not supported"),
        ({"$ref": "#/$defs/Nope"}, "does not name a schema of this one"),
        ({"$ref": "http://example.com/s.json"}, "does not name a schema of this one"),
        ({"$defs": {"A": {"not": {}}}, "$ref": "#/$defs/A"}, "unsupported keyword 'not' at #/$defs/A"),
        ({"items": [{"type": "string"}]}, "a list of schemas is not supported"),
        (False, "allows nothing"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_schemas_we_cannot_enforce_are_refused_in_one_line(schema, needle):
    with pytest.raises(SchemaError) as info:
        compile_schema(schema)
    message = str(info.value)
    assert needle in message and "\n" not in message, message


def test_a_pydantic_models_schema_compiles_and_what_it_allows_validates():

    class Point(pydantic.BaseModel):
        x: float
        y: float

    class Shape(pydantic.BaseModel):
        name: str
        closed: bool = False
        points: list[Point]
        note: str | None = None
        drawn: datetime  # format date-time
        code: str = pydantic.Field(pattern=r"^[a-f]{2}\d$")
        sides: int = pydantic.Field(ge=3, le=12)
        site: pydantic.HttpUrl  # format uri, 1 to 2083 characters
        gateway: IPv6Address  # format ipv6
        every: timedelta  # format duration
        opacity: float = pydantic.Field(gt=0, lt=1)
        # (pydantic checks multiple_of in floats: past about 1e6, it refuses some exact multiples of 0.01)
        price: float = pydantic.Field(ge=0, le=10_000, multiple_of=0.01)
        eggs: int = pydantic.Field(multiple_of=12)

    schema = Shape.model_json_schema()
    rng = random.Random(7)
    texts = [t for t in (_walk(schema, rng) for _ in range(100)) if t is not None]
    assert len(texts) >= 20
    for text in texts:
        Shape.model_validate_json(text)  # pydantic itself reads what we allowed


def test_each_formats_lengths_are_its_patterns():
    """FORMAT_LENGTHS, against which a schema's minLength and maxLength are checked, are the shortest and the
    longest match of each format's pattern (as Python's own regular expression parser measures them)."""
    import re._parser as parser  # (the stdlib's; our patterns use only its syntax)

    from lorakit.serve.formats import FORMAT_LENGTHS
    from lorakit.serve.formats import FORMATS as PATTERNS

    assert set(FORMAT_LENGTHS) == set(PATTERNS) == set(FORMATS)
    for name, pattern in PATTERNS.items():
        assert parser.parse(pattern).getwidth() == FORMAT_LENGTHS[name], name
    # lengths every value keeps are no constraint: pydantic's HttpUrl says 1 to 2083 characters
    state = Matcher(compile_schema({"type": "string", "format": "uri", "minLength": 1, "maxLength": 2083}))
    assert state.advance('"http://a.b/c"').complete


def test_ipv6_addresses_in_every_form_are_allowed():
    """Every IPv6 address, compressed (as Python writes it) and in full, without an IPv4 part."""
    rng = random.Random(5)
    masks = [0, (1 << 128) - 1, (1 << 64) - 1, 0xFFFF << 112, (1 << 128) - (1 << 32), 0xFFFF0000FFFF]
    g = compile_schema({"type": "string", "format": "ipv6"})
    for _ in range(2000):
        address = IPv6Address(rng.getrandbits(128) & rng.choice(masks))
        for text in {str(address), address.exploded}:
            if "." not in text:
                state = Matcher(g).advance(json.dumps(text))
                assert state is not None and state.complete, text
    for text in ("1::2::3", "12345::", "1:2:3:4:5:6:7:8:9", ":1", "g::"):
        state = Matcher(g).advance(json.dumps(text))
        assert state is None or not state.complete, text
