"""Training on tool calls: OpenAI's `tools`/`tool_calls`/`tool` messages and ShareGPT's function_call and
observation turns read as one conversation shape, and rendered for the chat template as `lorakit serve` renders a
request (`lorakit.data.toolcalls`), so that what an adapter learns is what the server parses back."""

from __future__ import annotations

import json

import pytest

from lorakit.data.jsonl import read_examples
from lorakit.data.tokenize import encode_example

from tiny import learned_text, write_jsonl

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CALLED = [
    {"role": "user", "content": "Is it raining in Oslo?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
        ],
    },
    {"role": "tool", "content": '{"rain": true}'},
    {"role": "assistant", "content": "Yes, it is raining in Oslo."},
]


def test_sharegpt_function_calls_and_observations_become_openai_tool_messages(tmp_path):
    """LLaMA-Factory's tool-calling ShareGPT: `tools` as JSON text, function_call and observation turns."""
    row = {
        "conversations": [
            {"from": "human", "value": "Is it raining in Oslo?"},
            {
                "from": "function_call",
                "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}}),
            },
            {"from": "observation", "value": '{"rain": true}'},
            {"from": "gpt", "value": "Yes, it is raining in Oslo."},
        ],
        "tools": json.dumps([WEATHER]),
    }
    assert read_examples(write_jsonl(tmp_path / "t.jsonl", [row])) == [
        {"messages": CALLED, "tools": [WEATHER]}
    ]


def test_openai_tool_call_records_keep_their_calls_and_functions(tmp_path):
    """OpenAI's fine-tuning format for function calling: tools in OpenAI's wrapper, arguments as JSON text."""
    msgs = json.loads(json.dumps(CALLED))
    msgs[1]["tool_calls"][0] |= {"id": "call_1"}
    msgs[1]["tool_calls"][0]["function"]["arguments"] = '{"city": "Oslo"}'
    msgs[2]["tool_call_id"] = "call_1"
    reordered = {"parameters": WEATHER["parameters"], "strict": True, **WEATHER}  # as some exports write it
    row = {"messages": msgs, "tools": [{"type": "function", "function": reordered}]}
    (ex,) = read_examples(write_jsonl(tmp_path / "t.jsonl", [row]))
    assert ex == {"messages": msgs, "tools": [WEATHER]}
    # the function as lorakit serve describes a request's: these keys in this order, so the same text
    assert list(ex["tools"][0]) == ["name", "description", "parameters"]
    bare = {"messages": msgs, "tools": [{"name": "get_weather"}]}  # no parameters: an empty object, as served
    (ex,) = read_examples(write_jsonl(tmp_path / "b.jsonl", [bare]))
    assert ex["tools"] == [{"name": "get_weather", "parameters": {"type": "object", "properties": {}}}]


@pytest.mark.real_model
def test_a_tool_call_trains_as_lorakit_serve_renders_it(tok):
    """SmolLM2's template does not render tools: the functions go into a system message and the call is its JSON,
    exactly as lorakit serve renders a request with these tools; the loss learns the call and the final answer."""
    from lorakit.data.toolcalls import renders_tools
    from lorakit.serve.tools import parse_tools
    from lorakit.train.evaluate import prompt_and_answer

    assert not renders_tools(tok)
    ex = {"messages": CALLED, "tools": [WEATHER]}
    enc = encode_example(tok, ex, max_len=512)
    served = parse_tools({"tools": [{"type": "function", "function": WEATHER}]}).prompt(CALLED, False)
    assert tok.decode(enc.input_ids) == tok.apply_chat_template(served, tokenize=False)
    learned = learned_text(tok, enc)
    call = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    assert learned == f"{call}<|im_end|>\nYes, it is raining in Oslo.<|im_end|>\n"
    assert "rain" not in learned.replace("raining", "") and "You can call" not in learned
    prompt, answer, extra = prompt_and_answer({"messages": CALLED[:2], "tools": [WEATHER]}, tok)
    assert answer == call and prompt == served[:2] and extra == {}


HERMES = (  # a template that renders tools and calls itself (Hermes' and Qwen's way, shortened)
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools><|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.real_model
def test_a_template_that_renders_tools_gets_them_itself(default_model_dir):
    from transformers import AutoTokenizer

    from lorakit.data.toolcalls import renders_tools
    from lorakit.train.evaluate import prompt_and_answer

    tok = AutoTokenizer.from_pretrained(default_model_dir, local_files_only=True)
    tok.chat_template = HERMES
    assert renders_tools(tok)
    enc = encode_example(tok, {"messages": CALLED, "tools": [WEATHER]}, max_len=512)
    text = tok.decode(enc.input_ids)
    assert text.startswith("<|im_start|>system\n<tools>{") and '"get_weather"' in text
    assert "You can call these functions" not in text  # no description of ours: the template has its own
    learned = learned_text(tok, enc)
    assert learned.startswith('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>')
    assert learned.endswith("Yes, it is raining in Oslo.<|im_end|>\n") and '{"rain": true}' not in learned
    # an answer that is a call the template renders has no text to compare: exact-match accuracy skips it
    assert prompt_and_answer({"messages": CALLED[:2], "tools": [WEATHER]}, tok) is None
