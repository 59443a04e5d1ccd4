"""`lorakit serve`'s structured output (JSON mode, JSON schemas, choices and regular expressions), on the real
default model, through the official `openai` client against a real server (test_serve's fixtures: its own server
for this module). Answers are checked with `json` and `jsonschema`, never against our own automaton.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta
from pathlib import Path

import pydantic
import pytest
from test_serve import base, client, dirs, http, server, url  # noqa: F401 - fixtures

pytestmark = pytest.mark.real_model


CHAT = [{"role": "user", "content": "List three colours, then list them again."}]
JSON_QUESTIONS = ["Describe a cat as a JSON object with its name and age.", "List three fruits.", "Hello!"]


def together(*calls):
    """The calls' results, the calls made at once as concurrent clients make them: the server decodes them in one
    batch, which is faster than one after another, and each answer is the one it gets alone (test_serve's
    test_concurrent_adapters_match_offline, test_serve_choices' test_a_batch_of_prompts_answers_each_as_alone)."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_json_mode_answers_are_json_objects(client, base, temperature):  # noqa: F811
    """Whatever the question, the answer is one JSON object (a prefix of one when max_tokens cuts it), on the base
    and on an adapter; without JSON mode the greedy answer to "Hello!" is no JSON at all."""
    from lorakit.serve.guide import JsonPrefix

    fmt = {"type": "json_object"}

    def ask(model, q, **kw):
        messages = [{"role": "user", "content": q}]
        return lambda: client.chat.completions.create(model=model, messages=messages, **kw).choices[0]

    kw = {"max_tokens": 120, "temperature": temperature, "seed": 3, "response_format": fmt}
    *answers, plain = together(
        *(ask(model, q, **kw) for model in (base, "a") for q in JSON_QUESTIONS),
        ask(base, "Hello!", max_tokens=40, temperature=0),
    )
    stopped = 0
    for choice in answers:
        text = choice.message.content
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(text), dict), text
            stopped += 1
        else:
            assert choice.finish_reason == "length" and JsonPrefix().feed(text), text
    assert stopped >= 3, "most answers should end as whole objects within 120 tokens"
    with pytest.raises(ValueError):
        json.loads(plain.message.content)


def test_json_mode_streams_and_works_on_completions(client, base):  # noqa: F811
    from lorakit.serve.guide import JsonPrefix

    fmt = {"type": "json_object"}
    kw = {"model": base, "messages": [{"role": "user", "content": JSON_QUESTIONS[0]}], "max_tokens": 120}
    whole = (
        client.chat.completions.create(**kw, temperature=0, response_format=fmt).choices[0].message.content
    )
    chunks = client.chat.completions.create(**kw, temperature=0, response_format=fmt, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert isinstance(json.loads(whole), dict)
    done = client.completions.create(
        model=base,
        prompt="A JSON object describing a dog:",
        max_tokens=100,
        temperature=0,
        extra_body={
            "response_format": fmt
        },  # vLLM's extension on completions: the client has no such argument
    ).choices[0]
    if done.finish_reason == "stop":
        assert isinstance(json.loads(done.text), dict), done.text
    else:  # the model may list a dog's features past max_tokens: then a prefix of one object
        assert (
            done.finish_reason == "length" and JsonPrefix().feed(done.text) and done.text.lstrip()[0] == "{"
        )


CAT = json.loads(
    (Path(__file__).resolve().parents[1] / "examples" / "structured" / "cat.schema.json").read_text()
)


def test_json_schema_answers_validate(client, base):  # noqa: F811
    """response_format json_schema (chat, whole and streamed; base and adapter) and vLLM's guided_json on
    completions: every answer that ends is a document the schema allows (checked by jsonschema); guided_choice
    answers one of its choices."""
    import jsonschema

    class Trip(pydantic.BaseModel):  # formats as pydantic writes them: duration, uri (1 to 2083 characters)
        flight: timedelta
        airline: pydantic.HttpUrl

    def chat(model, content, **kw):
        messages = [{"role": "user", "content": content}]
        return lambda: client.chat.completions.create(model=model, messages=messages, **kw).choices[0]

    def text(model, prompt, **kw):
        return lambda: client.completions.create(model=model, prompt=prompt, **kw).choices[0]

    fmt = {"type": "json_schema", "json_schema": {"name": "cat", "schema": CAT, "strict": True}}
    phone = r"\(\d{3}\) \d{3}-\d{4}"
    dated = {
        "type": "object",
        "properties": {"day": {"type": "string", "format": "date"}},
        "required": ["day"],
    }
    rated = {
        "type": "object",
        "properties": {
            "stars": {"type": "integer", "minimum": 1, "maximum": 5},
            "confidence": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "half_stars": {"type": "number", "minimum": 0, "maximum": 5, "multipleOf": 0.5},
        },
        "required": ["stars", "confidence", "half_stars"],
    }
    choices = ["positive", "negative", "neutral"]
    trip_question = [
        {"role": "user", "content": "Describe a trip: its flight time and the airline's website."}
    ]
    day_format = {"type": "json_schema", "json_schema": {"name": "day", "schema": dated}}
    rating_format = {"type": "json_schema", "json_schema": {"name": "rating", "schema": rated}}
    *cats, done, number, day, trip, rating0, rating1, yes, no = together(
        *(
            chat(m, "Describe a cat.", max_tokens=150, temperature=t, seed=5, response_format=fmt)
            for m in (base, "a")
            for t in (0, 1.0)
        ),
        text("a", "A cat:", max_tokens=150, temperature=0, extra_body={"guided_json": json.dumps(CAT)}),
        text(base, "Call us at", max_tokens=20, temperature=0, extra_body={"guided_regex": phone}),
        chat(
            base, "When did the Berlin wall fall?", max_tokens=40, temperature=0, response_format=day_format
        ),
        lambda: client.chat.completions.parse(  # (the small model writes long URLs: ~70 tokens here)
            model=base, messages=trip_question, max_tokens=200, temperature=0, response_format=Trip
        ).choices[0],
        *(
            chat(
                "a",
                "Rate the film Casablanca.",
                max_tokens=60,
                temperature=t,
                seed=3,
                response_format=rating_format,
            )
            for t in (0, 1.0)
        ),
        *(
            chat(
                base,
                f"Sentiment of: {s}",
                max_tokens=10,
                temperature=0,
                extra_body={"guided_choice": choices},
            )
            for s in ("I love this!", "This is awful.")
        ),
    )
    for choice in cats:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), CAT)
    whole = chat(base, "Describe a cat.", max_tokens=150, temperature=0, response_format=fmt)()
    chunks = client.chat.completions.create(
        model=base,
        messages=[{"role": "user", "content": "Describe a cat."}],
        max_tokens=150,
        temperature=0,
        response_format=fmt,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.message.content
    assert done.finish_reason == "stop"
    jsonschema.validate(json.loads(done.text), CAT)
    assert re.fullmatch(phone, number.text) and number.finish_reason == "stop", number
    date.fromisoformat(json.loads(day.message.content)["day"])  # a real calendar date
    assert trip.finish_reason == "stop" and isinstance(trip.message.parsed, Trip), trip  # pydantic read it
    for rating in (rating0, rating1):
        assert rating.finish_reason == "stop", rating
        jsonschema.validate(json.loads(rating.message.content), rated)  # within the bounds, in half stars
    for answer in (yes, no):
        assert answer.message.content in choices and answer.finish_reason == "stop", answer


@pytest.mark.parametrize(
    "extra, message, code",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {}}},
            'json_schema needs {"json_schema": {"name": ..., "schema": {...}}}',
            "invalid_request",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {"type": "integer", "not": {"const": 2}}},
                }
            },
            "response_format.json_schema.schema: unsupported keyword 'not' at #",
            "invalid_request",
        ),
        (
            {"guided_json": {"properties": {"n": {"multipleOf": 0}}}},
            "guided_json: 'multipleOf' at #/properties/n must be more than 0, got 0",
            "invalid_request",
        ),
        ({"guided_json": "{not json"}, "'guided_json' is a string but not JSON", "invalid_request"),
        ({"guided_choice": []}, "guided_choice: choices must be a list of 1 to", "invalid_request"),
        ({"guided_regex": "(a"}, "guided_regex: guided_regex is not a regular expression", "invalid_request"),
        (
            {"response_format": {"type": "json_object"}, "guided_choice": ["a"]},
            "give one of 'response_format' and 'guided_choice', not both",
            "invalid_request",
        ),
        ({"response_format": {"type": "xml"}}, 'must be {"type": "text"}', "invalid_request"),
        ({"response_format": "json"}, 'must be {"type": "text"}', "invalid_request"),
        (
            {"response_format": {"type": "json_object"}, "ignore_eos": True},
            "cannot be used",
            "invalid_request",
        ),
        ({"guided_choice": ["a", "b"], "ignore_eos": True}, "cannot be used", "invalid_request"),
    ],
)
def test_bad_response_formats_are_one_line_400s(http, base, extra, message, code):  # noqa: F811
    r = http.post("/v1/chat/completions", json={"model": base, "messages": CHAT, "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["code"] == code and "\n" not in err["message"], err
