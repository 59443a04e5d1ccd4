"""Structured output and tool calls from `lorakit serve`, through the official OpenAI client.

Needs the OpenAI client (`pip install openai`; the test extras have it). Start a server (`lorakit serve`, or
`lorakit serve --adapter NAME=DIR` and pass --model NAME), then:

    python examples/structured/ask.py                       # against http://127.0.0.1:8000/v1
    python examples/structured/ask.py --url http://host:8000/v1 --model dates

It asks three things and prints what comes back:
1. a cat, as a JSON document that cat.schema.json allows (`response_format` json_schema);
2. a cat as a pydantic model, with the client's own `parse` helper, which sends the model's strict JSON Schema
   and reads the answer back into the model;
3. the weather in Paris through a tool: the server answers with a call to `get_weather`, the script runs it and
   sends the result back, and the model answers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Annotated

import pydantic
from openai import OpenAI

HERE = Path(__file__).resolve().parent
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
        },
    },
}


class Cat(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    age: int = pydantic.Field(ge=0, le=30)
    weight_kg: float = pydantic.Field(gt=0, le=15, multiple_of=0.5)  # to the half kilogram
    indoor: bool
    toys: list[Annotated[str, pydantic.Field(max_length=15)]] = pydantic.Field(max_length=3)


def get_weather(city: str) -> str:
    return f"18 degrees celsius and cloudy in {city}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the server's /v1 address")
    p.add_argument("--model", default="SmolLM2-135M-Instruct", help="the base model's name or an adapter's")
    p.add_argument("--api-key", default="-", help="the server's --api-key, if it has one")
    args = p.parse_args(argv)
    client = OpenAI(base_url=args.url, api_key=args.api_key)
    ask = [{"role": "user", "content": "Describe a cat."}]

    schema = json.loads((HERE / "cat.schema.json").read_text())
    fmt = {"type": "json_schema", "json_schema": {"name": "cat", "schema": schema}}
    r = client.chat.completions.create(model=args.model, messages=ask, response_format=fmt, max_tokens=200)
    doc = json.loads(r.choices[0].message.content)
    print("1. json_schema:", json.dumps(doc))  # the document, on one line

    parsed = client.chat.completions.parse(
        model=args.model, messages=ask, response_format=Cat, max_tokens=200
    )
    print("2. pydantic:", repr(parsed.choices[0].message.parsed))

    messages = [{"role": "user", "content": "What is the weather like in Paris?"}]
    r = client.chat.completions.create(
        model=args.model, messages=messages, tools=[WEATHER], tool_choice="required", max_tokens=100
    )
    call = r.choices[0].message.tool_calls[0]
    result = get_weather(**json.loads(call.function.arguments))
    print(f"3. the model called {call.function.name}({call.function.arguments}) -> {result!r}")
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    r = client.chat.completions.create(model=args.model, messages=messages, tools=[WEATHER], max_tokens=60)
    print("   and then answered:", r.choices[0].message.content)
    return 0


if __name__ == "__main__":
    sys.exit(main())
