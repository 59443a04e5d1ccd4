"""The keywords of one JSON Schema value, checked and compiled for `lorakit.serve.schema`: a string's
`pattern` (and the patterns of known `format`s), its and an array's length bounds, and a number's bounds and
`multipleOf` (`lorakit.serve.numbers.Num`). A keyword that cannot be honoured raises a `SchemaError` naming it and
where it is."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

from lorakit.serve.formats import FORMAT_LENGTHS, FORMATS
from lorakit.serve.numbers import MAX_STEP_DECIMALS, Num, decimals


class SchemaError(ValueError):
    """A schema that cannot be compiled: one line naming the keyword and where it is (a JSON pointer)."""


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


def string_pattern(s: dict, where: str) -> Any:
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


def format_lengths(fmt: str, lo: int, hi: int | None, where: str) -> tuple[int, int | None]:
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


def number(s: dict, integer: bool, where: str) -> Num:
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


def bounds(s: dict, lo_key: str, hi_key: str, where: str) -> tuple[int, int | None]:
    lo, hi = s.get(lo_key, 0), s.get(hi_key)
    for key, value in ((lo_key, lo), (hi_key, hi)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise SchemaError(f"{key!r} at {where} must be an integer >= 0, got {value!r}")
    if hi is not None and lo > hi:
        raise SchemaError(f"{lo_key!r} {lo} is more than {hi_key!r} {hi} at {where}: nothing fits")
    return lo, hi
