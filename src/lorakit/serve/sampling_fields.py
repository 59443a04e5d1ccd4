"""The sampling fields of a completions or chat request: temperature, top_p, stop, seed, the penalties,
logit_bias, and structured output (response_format, vLLM's guided_json, guided_choice, guided_regex), each
checked with a 400 that names it. `sampling(body)` gives the `SamplingParams` fields they set."""

from __future__ import annotations

import json
from typing import Any

from lorakit.serve.api_errors import bad, boolean, number
from lorakit.serve.schema import (
    JSON_OBJECT,
    Grammar,
    SchemaError,
    compile_choices,
    compile_pattern,
    compile_schema,
)

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes (negatives wrap around)
MAX_LOGIT_BIAS = 1024  # most entries of logit_bias


def sampling(body: dict[str, Any]) -> dict[str, Any]:
    temperature = number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise bad("'top_p' must be in (0, 1]", "top_p")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise bad("'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in stop_ids
    ):
        raise bad("'stop_token_ids' must be a list of token ids", "stop_token_ids")
    seed = body.get("seed")
    if seed is not None and (
        not isinstance(seed, int) or isinstance(seed, bool) or not SEED_MIN <= seed <= SEED_MAX
    ):
        raise bad(f"'seed' must be a 64-bit integer, in [-2**63, 2**64 - 1], got {seed!r}", "seed")
    guide = _guide(body)
    if guide is not None and boolean(body, "ignore_eos"):
        raise bad(
            "'ignore_eos' cannot be used with structured output (response_format, guided_json, guided_choice): "
            "the output's end ends it",
            "ignore_eos",
        )
    return {
        "guide": guide,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "stop": tuple(stop),
        "stop_token_ids": tuple(stop_ids),
        "ignore_eos": boolean(body, "ignore_eos"),
        "frequency_penalty": number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        "presence_penalty": number(body, "presence_penalty", 0.0, -2.0, 2.0),
        "repetition_penalty": _repetition_penalty(body),
        "logit_bias": _logit_bias(body),
    }


def _guide(body: dict[str, Any]) -> Grammar | None:
    """What the output must be, if anything: OpenAI's response_format (`json_object`: any JSON object;
    `json_schema`: a document its schema allows), or vLLM's guided_json (a schema), guided_choice (one of a list
    of strings) or guided_regex (a text a regular expression fullmatches). At most one of them."""
    given = [
        k
        for k in ("response_format", "guided_json", "guided_choice", "guided_regex")
        if body.get(k) is not None
    ]
    given = [k for k in given if k != "response_format" or _format_kind(body[k]) != "text"]
    if len(given) > 1:
        raise bad(f"give one of {given[0]!r} and {given[1]!r}, not both", given[1])
    if not given:
        return None
    key = given[0]
    try:
        if key == "guided_choice":
            return compile_choices(body[key])
        if key == "guided_regex":
            return compile_pattern(body[key])
        if key == "guided_json":
            schema = body[key]
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError:
                    raise bad(
                        "'guided_json' is a string but not JSON: give the schema as an object", key
                    ) from None
            return compile_schema(schema)
        value = body[key]
        if _format_kind(value) == "json_object":
            return JSON_OBJECT
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict | bool):
            raise bad(
                'response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}', key
            )
        return compile_schema(spec["schema"])
    except SchemaError as e:
        where = "response_format.json_schema.schema" if key == "response_format" else key
        raise bad(f"{where}: {e}"[:500], key) from None


def _format_kind(value: Any) -> str:
    """The type of a response_format: text, json_object or json_schema; 400 for anything else."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise bad(
            '\'response_format\' must be {"type": "text"}, {"type": "json_object"} or '
            f'{{"type": "json_schema", "json_schema": {{...}}}}, got {value!r}'[:200],
            "response_format",
        )
    return kind


def _repetition_penalty(body: dict[str, Any]) -> float:
    value = body.get("repetition_penalty")
    if value is None:
        return 1.0
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 100:
        raise bad(
            f"'repetition_penalty' must be a number in (0, 100] (1: off), got {value!r}", "repetition_penalty"
        )
    return float(value)


def _logit_bias(body: dict[str, Any]) -> tuple[tuple[int, float], ...]:
    """{"token id": bias} as sorted (id, bias) pairs; the ids' range is checked against the vocabulary later."""
    value = body.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise bad(
            f"'logit_bias' must be an object of at most {MAX_LOGIT_BIAS} token ids to biases", "logit_bias"
        )
    out = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise bad(f"'logit_bias': {key[:40]!r} is not a token id (a non-negative integer)", "logit_bias")
        if not isinstance(bias, (int, float)) or isinstance(bias, bool) or not -100 <= bias <= 100:
            raise bad(f"'logit_bias'[{key!r}] must be a number in [-100, 100], got {bias!r}", "logit_bias")
        out.append((int(key), float(bias)))
    return tuple(sorted(out))
