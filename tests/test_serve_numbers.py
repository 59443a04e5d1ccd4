"""Numbers in structured output (`lorakit.serve.numbers`, through `lorakit.serve.schema`) against the reference
validator `jsonschema`: under bounds of every kind and under `multipleOf`, a number completes exactly when the
validator accepts it, and no start leads to a dead end; multiples count exactly, where a validator that divides
floats does not."""

from __future__ import annotations

import json
import random

import jsonschema

from lorakit.serve.matcher import Matcher
from lorakit.serve.schema import SchemaError, compile_schema


def test_numbers_within_bounds_are_exactly_what_the_validator_accepts():
    """For bounds of every kind (inclusive, exclusive, draft 4's boolean, one side, fractions, negative) and many
    numbers: the automaton ends on a number exactly when the validator accepts it, and never leads into a dead
    end (a start that no allowed number continues)."""
    rng = random.Random(11)
    limits = [None, -100, -2.5, -1, 0, 0.25, 1, 7, 12.5, 150, 1000]
    numbers = [
        "0",
        "-0",
        "1",
        "-1",
        "7",
        "10",
        "12.5",
        "12.49",
        "150",
        "150.0",
        "151",
        "999",
        "1000",
        "0.001",
    ]
    numbers += ["-2.5", "-2.51", "-100", "-100.5", "0.25", "0.2500001", "-0.0"]
    numbers += [str(rng.randint(-2000, 2000)) for _ in range(40)]
    numbers += [f"{rng.uniform(-200, 200):.{rng.randint(1, 4)}f}" for _ in range(40)]
    for _ in range(300):
        lo, hi = rng.choice(limits), rng.choice(limits)
        schema: dict = {"type": rng.choice(["integer", "number"])}
        draft4 = rng.random() < 0.2  # draft 4's way: exclusiveMinimum/-Maximum are booleans beside the bounds
        for key, limit in (("Minimum", lo), ("Maximum", hi)):
            if limit is None:
                continue
            exclusive = rng.random() < 0.4
            if draft4:
                schema[key.lower()] = limit
                if exclusive:
                    schema[f"exclusive{key}"] = True
            else:
                schema[f"exclusive{key}" if exclusive else key.lower()] = limit
        validator = jsonschema.Draft4Validator if draft4 else jsonschema.Draft202012Validator
        _numbers_agree(schema, validator(schema), numbers)


def _numbers_agree(schema: dict, validator, numbers: list[str]) -> bool:
    """The automaton of `schema` (a number or integer) ends on each of `numbers` exactly when `validator` accepts
    it, and never leads into a dead end; a schema refused as "nothing fits" accepts none of them. Compiled?"""
    try:
        grammar = compile_schema(schema)
    except SchemaError as e:
        assert "nothing fits" in str(e)  # then no number at all may be accepted
        assert not any(validator.is_valid(json.loads(n)) for n in numbers), schema
        return False
    for text in numbers:
        valid = validator.is_valid(json.loads(text))
        if schema["type"] == "integer" and "." in text:
            valid = False  # (JSON Schema takes 150.0 as an integer; we write integers without a point)
        if text.startswith("-") and float(text) == 0:
            valid = False  # (nor -0 under bounds)
        state = Matcher(grammar)
        for ch in text:
            # never a dead end: what is allowed so far is a whole number or can still become one
            assert state.complete or any(state.advance(c) for c in "0123456789.-"), (schema, text)
            state = state.advance(ch)
            if state is None:
                break
        assert (state is not None and state.complete) == valid, (schema, text)
    return True


def test_multiples_are_exactly_what_the_validator_accepts():
    """multipleOf, alone and with bounds of every kind, on integers and numbers: the automaton ends on a number
    exactly when the validator accepts it, and never leads into a dead end. The steps are exact in binary (0.5,
    0.25, 2.5) or integers, where jsonschema's float division is exact too (see the next test for 0.1)."""
    rng = random.Random(12)
    limits = [None, -100, -2.5, -1, 0, 0.25, 1, 7, 12.5, 150]
    steps = [2, 3, 5, 7, 10, 12, 0.5, 0.25, 2.5, 1.5]
    numbers = ["0", "-0", "1", "2", "-2", "3", "7.5", "10", "12", "12.5", "12.75", "12.7", "-7.5", "150"]
    numbers += ["0.25", "0.5", "1.0", "100", "-100", "21", "35", "49", "60", "1.25", "-1.25", "2.50", "3.75"]
    numbers += [str(rng.randint(-200, 200)) for _ in range(40)]
    numbers += [f"{rng.randint(-400, 400) / 4:.2f}" for _ in range(30)]
    numbers += [f"{rng.uniform(-200, 200):.{rng.randint(1, 3)}f}" for _ in range(20)]
    compiled = 0
    for _ in range(300):
        schema: dict = {"type": rng.choice(["integer", "number"]), "multipleOf": rng.choice(steps)}
        for key, limit in (("Minimum", rng.choice(limits)), ("Maximum", rng.choice(limits))):
            if limit is not None:
                schema[f"exclusive{key}" if rng.random() < 0.4 else key.lower()] = limit
        compiled += _numbers_agree(schema, jsonschema.Draft202012Validator(schema), numbers)
    assert compiled > 100  # (the others' bounds leave no multiple: checked above)


def test_multiples_of_a_decimal_step_count_exactly():
    """0.3 is a multiple of 0.1 (Python's jsonschema divides floats and says it is not: 0.3 / 0.1 is
    2.9999999999999996); the integers that are multiples of 2.5 are those of 5."""

    def allows(schema, text):
        state = Matcher(compile_schema(schema)).advance(text)
        return state is not None and state.complete

    tenth = {"type": "number", "multipleOf": 0.1}
    assert allows(tenth, "0.3") and allows(tenth, "12.7") and allows(tenth, "-4") and allows(tenth, "0.30")
    assert not allows(tenth, "0.35") and Matcher(compile_schema(tenth)).advance("0.35") is None
    fives = {"type": "integer", "multipleOf": 2.5}
    assert allows(fives, "15") and not allows(fives, "12") and allows(fives, "-5") and not allows(fives, "2")
    money = {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.01}
    assert allows(money, "0.99") and allows(money, "1") and not allows(money, "0.999")
    state = Matcher(compile_schema(money)).advance("0.99")
    assert state.advance("0") is not None and state.advance("9") is None  # 0.990 still is 0.99
