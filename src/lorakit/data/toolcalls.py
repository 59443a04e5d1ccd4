"""Tool calls in a conversation, rendered for a chat template: one rule for training and for `lorakit serve`.

    native = renders_tools(tokenizer)              # does the chat template put `tools` into the prompt?
    messages = tool_prompt(messages, specs, native=native)
    text = tokenizer.apply_chat_template(messages, tools=tool_specs(specs) if native and specs else None, ...)

A conversation holds OpenAI's shapes: an assistant message's `tool_calls` (`[{"type": "function", "function":
{"name", "arguments"}}]`, the arguments a JSON string or an object) and `tool` messages with a call's result;
`specs` are the functions offered (`{"name", "description", "parameters"}`).

Where the template renders tools (Hermes, Qwen, Llama 3.1 and others do), the messages go to it as they are, each
call's arguments as an object (Hugging Face's shape). Otherwise (SmolLM2's template, for one) a system message
describes the functions as JSON Schemas and asks for a call as one JSON object `{"name": ..., "arguments":
{...}}`; an assistant's calls become that JSON (several: each in `<tool_call>` tags), and results become
`<tool_response>` user turns. An adapter trained on such a conversation answers in the form `lorakit serve` parses
back into tool calls, because the server renders its requests with these same functions.
"""

from __future__ import annotations

import json
from typing import Any

CALL = '{"name": <the function\'s name>, "arguments": <an object of its arguments>}.'
_NATIVE: dict[str, bool] = {}  # chat template -> whether it renders tools


def renders_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template puts `tools` into the prompt (it renders a probe differently with
    them). Remembered per template."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return False
    key = template if isinstance(template, str) else json.dumps(template, sort_keys=True, default=str)
    if key not in _NATIVE:
        probe = [{"role": "user", "content": "hi"}]
        spec = {"name": "probe_fn", "description": "d", "parameters": {"type": "object", "properties": {}}}
        try:
            bare = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
            told = tokenizer.apply_chat_template(
                probe, tokenize=False, add_generation_prompt=True, tools=tool_specs([spec])
            )
            _NATIVE[key] = "probe_fn" in told and told != bare
        except Exception:  # noqa: BLE001 - a template that fails on tools does not render them
            _NATIVE[key] = False
    return _NATIVE[key]


NO_PARAMETERS = {"type": "object", "properties": {}}


def function_spec(fn: dict[str, Any]) -> dict[str, Any]:
    """A function as both sides describe it: its name, description (if any) and parameters (none: an empty
    object), in that order and nothing else (OpenAI's `strict`, say), so that a function renders the same in
    training and in a request."""
    spec = {k: fn[k] for k in ("name", "description") if fn.get(k) is not None}
    return spec | {"parameters": fn.get("parameters") if fn.get("parameters") is not None else NO_PARAMETERS}


def tool_specs(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The functions as a chat template's `tools` argument takes them."""
    return [{"type": "function", "function": s} for s in specs]


def describe(specs: list[dict[str, Any]], choice: str = "auto") -> str:
    """The system message that offers `specs` to a template that does not render tools. `choice`: OpenAI's
    tool_choice ("auto", "required", or a function's name)."""
    listed = "\n".join(json.dumps(s, ensure_ascii=False) for s in specs)
    if choice in ("auto", "none"):
        ask = f"To call one, answer with only a JSON object: {CALL}"
    else:
        which = "one of these functions" if choice == "required" else f"the function {choice}"
        ask = f"Answer by calling {which}: with only a JSON object {CALL}"
    return f"You can call these functions, given as JSON Schemas:\n<tools>\n{listed}\n</tools>\n{ask}"


def call_arguments(call: dict[str, Any]) -> Any:
    """A call's arguments as an object (the JSON string parsed), or as given if it does not parse."""
    args = call["function"].get("arguments", "{}")
    try:
        return json.loads(args) if isinstance(args, str) else args
    except ValueError:
        return args


def calls_text(calls: list[dict[str, Any]]) -> str:
    """An assistant's calls as a template without tools sees them: one JSON object, or each in <tool_call> tags."""
    texts = [
        json.dumps({"name": c["function"]["name"], "arguments": call_arguments(c)}, ensure_ascii=False)
        for c in calls
    ]
    return texts[0] if len(texts) == 1 else "\n".join(f"<tool_call>{t}</tool_call>" for t in texts)


def tool_prompt(
    messages: list[dict[str, Any]], specs: list[dict[str, Any]], *, native: bool, choice: str = "auto"
) -> list[dict[str, Any]]:
    """The messages for the chat template (see the module's docstring). An assistant message's `weight` (OpenAI's
    fine-tuning files) is kept."""
    if native:
        return [_hf_message(m) for m in messages]
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            text = ((m.get("content") or "") + "\n" + calls_text(m["tool_calls"])).strip()
            out.append({"role": "assistant", "content": text} | _weight(m))
        elif m["role"] == "tool":
            out.append(
                {"role": "user", "content": f"<tool_response>\n{m.get('content', '')}\n</tool_response>"}
            )
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""} | _weight(m))
    if not specs:  # a conversation with earlier calls, and no functions offered now
        return out
    described = describe(specs, choice)
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{described}"}
    else:
        out.insert(0, {"role": "system", "content": described})
    return out


def has_tools(example: dict[str, Any]) -> bool:
    """Whether a messages example offers functions or holds calls or their results."""
    return bool(example.get("tools")) or any(
        m.get("tool_calls") or m.get("role") == "tool" for m in example.get("messages", ())
    )


def _weight(m: dict[str, Any]) -> dict[str, Any]:
    return {"weight": m["weight"]} if "weight" in m else {}


def _hf_message(m: dict[str, Any]) -> dict[str, Any]:
    """A message as Hugging Face chat templates take it: a call's arguments as an object, not a JSON string."""
    if not m.get("tool_calls"):
        return m
    calls = [
        {"type": "function", "function": {"name": c["function"]["name"], "arguments": call_arguments(c)}}
        for c in m["tool_calls"]
    ]
    return {**m, "tool_calls": calls}
