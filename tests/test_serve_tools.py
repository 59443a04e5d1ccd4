"""Tool calls on `lorakit serve` (`lorakit.serve.tools`): forced calls are guided to valid arguments, free answers
that are calls come back as tool calls, earlier calls and results are rendered into the prompt, and bad tools get
one-line 400s. The parsing and the streamed hold-back are checked here directly; the rest through the `openai`
client against a real server on the real default model (test_serve's fixtures: its own server for this module).
"""

from __future__ import annotations

import json

import jsonschema
import pytest
from test_serve import (  # noqa: F401 - fixtures
    base,
    client,
    dirs,
    http,
    server,
    url,
)

from lorakit.serve.protocol import APIError
from lorakit.serve.tools import Tools, ToolStream, parse_tools

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 20}},
            "required": ["zone"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather like in Paris?"}]


def _tools(choice=None, tools=(WEATHER, TIME)) -> Tools:
    body = {"tools": list(tools)}
    if choice is not None:
        body["tool_choice"] = choice
    return parse_tools(body)


# --------------------------------------------------------------------------------------------------------------
# Without a model
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, names",
    [
        ('{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}', ["get_weather"]),
        (' <tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>', ["get_time"]),
        (
            '<tool_call>{"name": "get_time", "arguments": {"zone": "A"}}</tool_call>\n'
            '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"B\\"}"}</tool_call>',
            ["get_time", "get_weather"],
        ),
        ('```json\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n```', ["get_time"]),
        (
            '{"name": "get_time", "parameters": {"zone": "UTC"}}',
            ["get_time"],
        ),  # Llama 3.1 writes "parameters"
        ('{"name": "send_mail", "arguments": {}}', []),  # not a function given
        ('{"name": "get_time", "arguments": {"zone": "UTC"}', []),  # not whole
        ('Call {"name": "get_time", "arguments": {}}', []),  # text around it: an answer, not a call
        ('<tool_call>{"name": "get_time", "arguments": {}}</tool_call> and more', []),
        ("It is sunny in Paris.", []),
    ],
)
def test_answers_that_are_calls_become_tool_calls(text, names):
    calls = _tools().calls_of(text)
    assert [c["function"]["name"] for c in calls] == names
    for c in calls:
        assert c["type"] == "function" and c["id"].startswith("call_")
        assert isinstance(json.loads(c["function"]["arguments"]), dict)  # a JSON string, as OpenAI sends
    assert _tools("none").calls_of(text) == []  # "none": whatever it looks like, content


def test_a_streamed_answer_is_held_back_only_while_it_may_be_a_call():
    s = ToolStream(_tools())
    assert s.feed("  ") == "" and s.feed("<tool") == ""  # may still become "<tool_call>"
    assert s.feed("box> is") == "  <toolbox> is"  # it cannot: everything so far passes
    assert s.feed(" here") == " here" and s.finish() == ("", [])
    s = ToolStream(_tools())
    for part in ['{"name": "get_time", ', '"arguments": {"zone": "UTC"}}']:
        assert s.feed(part) == ""
    rest, calls = s.finish()
    assert rest == "" and [c["function"]["name"] for c in calls] == ["get_time"]
    s = ToolStream(_tools())
    assert s.feed('{"almost": "a call"}') == ""
    assert s.finish() == ('{"almost": "a call"}', [])  # held, and not a call after all: content at the end


def test_earlier_calls_and_results_are_rendered_for_a_template_without_tools():
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sunny"},
    ]
    out = _tools().prompt(messages, native=False)
    assert out[0]["role"] == "system" and '"name": "get_weather"' in out[0]["content"]
    assert out[1] == {"role": "user", "content": "Weather in Paris?"}
    assert json.loads(out[2]["content"]) == {
        "name": "get_weather",
        "arguments": {"city": "Paris", "unit": "celsius"},
    }
    assert out[3] == {"role": "user", "content": "<tool_response>\n21 C, sunny\n</tool_response>"}
    native = _tools().prompt(messages, native=True)  # Hugging Face's shape: arguments as an object
    assert native[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "unit": "celsius"}
    with_system = _tools().prompt([{"role": "system", "content": "Be brief."}, *messages], native=False)
    assert with_system[0]["content"].startswith("Be brief.\n\nYou can call these functions")


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"tools": "get_weather"}, "'tools' must be a list of up to"),
        ({"tools": [{"type": "function"}]}, 'tools[0] must be {"type": "function"'),
        (
            {"tools": [{"type": "function", "function": {"name": "a b"}}]},
            "tools[0].function.name must be 1 to 64",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools[1]: the function 'get_weather' is given twice"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {
                                "type": "object",
                                "properties": {"n": {"type": "integer", "not": {"const": 2}}},
                            },
                        },
                    }
                ]
            },
            "tools[0].function.parameters: unsupported keyword 'not' at #/properties/n",
        ),
        ({"tools": [WEATHER], "tool_choice": "always"}, "'tool_choice' must be"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "names no function",
        ),
        ({"tool_choice": "required"}, "'tool_choice' needs 'tools'"),
        ({"functions": [{"name": "f"}]}, "deprecated form of 'tools'"),
    ],
)
def test_bad_tools_are_refused_in_one_line(body, needle):
    with pytest.raises(APIError) as info:
        parse_tools(body)
    message = info.value.message
    assert info.value.status == 400 and needle in message and "\n" not in message, message


# --------------------------------------------------------------------------------------------------------------
# Through a real server
# --------------------------------------------------------------------------------------------------------------


def _arguments(call, tool) -> dict:
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


@pytest.mark.real_model
def test_a_forced_call_is_a_valid_call(client, base):  # noqa: F811
    """tool_choice naming a function, and "required": every answer is a call with arguments its schema allows, on
    the base and on an adapter, greedy and sampled; streamed, the same call arrives in tool_calls deltas."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    for model in (base, "a"):
        for temperature in (0, 1.0):
            r = client.chat.completions.create(
                model=model,
                messages=ASK,
                tools=[WEATHER, TIME],
                tool_choice=named,
                max_tokens=80,
                temperature=temperature,
                seed=1,
            )
            choice = r.choices[0]
            assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
            (call,) = choice.message.tool_calls
            assert call.function.name == "get_weather" and call.id.startswith("call_")
            _arguments(call, WEATHER)
    r = client.chat.completions.create(
        model=base, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=80, temperature=0
    )
    (call,) = r.choices[0].message.tool_calls
    _arguments(call, {"get_weather": WEATHER, "get_time": TIME}[call.function.name])
    whole = (
        client.chat.completions.create(
            model=base, messages=ASK, tools=[WEATHER], tool_choice=named, max_tokens=80, temperature=0
        )
        .choices[0]
        .message.tool_calls[0]
    )
    chunks = list(
        client.chat.completions.create(
            model=base,
            messages=ASK,
            tools=[WEATHER],
            tool_choice=named,
            max_tokens=80,
            temperature=0,
            stream=True,
        )
    )
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [d.function.name for d in deltas] == ["get_weather"]
    assert json.loads("".join(d.function.arguments for d in deltas)) == json.loads(whole.function.arguments)
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "tool_calls"
    ]


@pytest.mark.real_model
def test_a_conversation_with_a_call_and_its_result_goes_on(client, base):  # noqa: F811
    """The call the server made and the tool's result go back in the next request; the answer uses the result
    (the model is small: the check is that the prompt carries it, through the token count, and that it answers)."""
    first = (
        client.chat.completions.create(
            model=base, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=80, temperature=0
        )
        .choices[0]
        .message
    )
    call = first.tool_calls[0]
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "21 degrees celsius and sunny"},
    ]
    r = client.chat.completions.create(
        model=base, messages=messages, tools=[WEATHER], max_tokens=30, temperature=0
    )
    plain = client.chat.completions.create(
        model=base, messages=ASK, tools=[WEATHER], max_tokens=1, temperature=0
    )
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 10  # the call and the result are in the prompt
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls
    none = client.chat.completions.create(
        model=base, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=20, temperature=0
    ).choices[0]
    assert none.message.tool_calls is None and none.message.content


@pytest.mark.real_model
@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"tools": [WEATHER], "logprobs": True}, "'logprobs' cannot be used with 'tools'"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "give 'tool_choice' or 'response_format'",
        ),
        ({"tools": [WEATHER], "tool_choice": "maybe"}, "'tool_choice' must be"),
        (
            {"messages": [{"role": "assistant", "content": None, "tool_calls": "x"}]},
            "messages[0].tool_calls must be an assistant's list",
        ),
    ],
)
def test_bad_tool_requests_are_one_line_400s(http, base, extra, needle):  # noqa: F811
    body = {"model": base, "messages": ASK, "max_tokens": 2, **extra}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert needle in message and "\n" not in message, message
