"""Tool calls: OpenAI's `tools` and `tool_choice` on /v1/chat/completions, for any chat model.

    tools = parse_tools(body)                 # None without tools; 400 (APIError) for bad ones
    messages = tools.prompt(messages, native) # what the chat template renders
    calls = tools.calls_of(text)              # the calls an answer makes, or []

The functions reach the model through the chat template when it renders `tools` (Hermes, Qwen, Llama 3.1 and
others do); otherwise (SmolLM2's template, for one) a system message describes them, as JSON Schemas, and asks
for a call as one JSON object `{"name": ..., "arguments": {...}}`. Earlier calls and their results in the
conversation go the same way: as the template's own tool messages, or as that JSON and `<tool_response>` user
turns.

- `tool_choice: {"type": "function", "function": {"name": N}}` and `"required"`: the answer is guided
  (lorakit.serve.guide) to be exactly such an object for N, or for one of the functions, with arguments that
  the function's parameters schema allows (lorakit.serve.schema); it always comes back as a tool call.
- `"auto"` (the default with tools): the model answers freely; an answer that is such an object, or one or more
  `<tool_call>...</tool_call>` blocks holding them, naming a function given, comes back as tool calls. Streamed,
  an answer is held back while it may still become a call (it starts with `{`, ``` or `<tool_call>`).
- `"none"`: the model answers freely and its answer is content, whatever it looks like.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from lorakit.data.toolcalls import describe, function_spec, tool_prompt, tool_specs
from lorakit.serve.protocol import Parsed, bad
from lorakit.serve.schema import AnyOf, Grammar, Lit, Obj, SchemaError, compile_schema

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOOLS = 128
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)
HOLD = ("{", "```", "<tool_call>")
"""How an answer that may be a call starts (after whitespace)."""


@dataclass(frozen=True)
class Tool:
    name: str
    spec: dict[str, Any]  # {"name", "description"?, "parameters"}: the function as the request gave it
    params: Grammar


@dataclass(frozen=True)
class Tools:
    tools: tuple[Tool, ...]
    choice: str  # "none", "auto", "required", or the name of the function to call

    @property
    def active(self) -> bool:
        """Whether answers may be tool calls."""
        return self.choice != "none"

    @property
    def forced(self) -> bool:
        """Whether the answer must be a tool call (guided)."""
        return self.choice not in ("none", "auto")

    def grammar(self) -> Grammar | None:
        """The guide of a forced call: {"name": one of the functions, "arguments": what its parameters allow}."""
        if not self.forced:
            return None
        chosen = [t for t in self.tools if self.choice in ("required", t.name)]
        calls = [
            Obj((("name", Lit((json.dumps(t.name),)), True), ("arguments", t.params.root, True)))
            for t in chosen
        ]
        return Grammar(calls[0] if len(calls) == 1 else AnyOf(calls))

    def calls_of(self, text: str) -> list[dict[str, Any]]:
        """The tool calls `text` makes (OpenAI's shape, arguments as a JSON string), or [] if it is not calls."""
        if not self.active:
            return []
        s = text.strip()
        fenced = _FENCE.fullmatch(s)
        if fenced:
            s = fenced.group(1)
        blocks = _BLOCK.findall(s)
        if blocks and not _BLOCK.sub("", s).strip():
            bodies = blocks
        elif s.startswith("{"):
            bodies = [s]
        else:
            return []
        calls = []
        for body in bodies:
            call = self._call(body)
            if call is None:
                return []
            calls.append(call)
        return calls

    def _call(self, body: str) -> dict[str, Any] | None:
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        names = [t.name for t in self.tools]
        if obj["name"] not in names or (self.forced and self.choice not in ("required", obj["name"])):
            return None
        return {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)},
        }

    def prompt(self, messages: list[dict[str, Any]], native: bool) -> list[dict[str, Any]]:
        """The messages for the chat template: as they are, with their calls in Hugging Face's shape, when the
        template renders tools (`native`); else with a system message describing the functions, calls as their
        JSON, and results as <tool_response> user turns. Training renders its conversations the same way
        (`lorakit.data.toolcalls`)."""
        return tool_prompt(messages, [t.spec for t in self.tools], native=native, choice=self.choice)

    def describe(self) -> str:
        return describe([t.spec for t in self.tools], self.choice)

    def specs(self) -> list[dict[str, Any]]:
        """The functions as a chat template's `tools` argument takes them."""
        return tool_specs([t.spec for t in self.tools])


def parse_tools(body: dict[str, Any]) -> Tools | None:
    """`tools` and `tool_choice` of a chat request, checked; None without tools."""
    for key in ("functions", "function_call"):
        if body.get(key) is not None:
            raise bad(f"{key!r} is OpenAI's deprecated form of 'tools': send 'tools' and 'tool_choice'", key)
    raw, choice = body.get("tools"), body.get("tool_choice")
    if raw is None or raw == []:
        if choice not in (None, "none"):
            raise bad("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(raw, list) or len(raw) > MAX_TOOLS:
        raise bad(f"'tools' must be a list of up to {MAX_TOOLS} functions", "tools")
    tools = []
    for i, t in enumerate(raw):
        where = f"tools[{i}]"
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict):
            raise bad(
                f'{where} must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}',
                where,
            )
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise bad(
                f"{where}.function.name must be 1 to 64 letters, digits, _ or -, got {name!r}"[:200], where
            )
        if any(other.name == name for other in tools):
            raise bad(f"{where}: the function {name!r} is given twice", where)
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise bad(f"{where}.function.description must be a string", where)
        spec = function_spec(fn)
        params = spec["parameters"]
        try:
            grammar = compile_schema(params)
        except SchemaError as e:
            raise bad(f"{where}.function.parameters: {e}"[:500], where) from None
        tools.append(Tool(name, spec, grammar))
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        choice = fn.get("name") if isinstance(fn, dict) else None
        if choice not in [t.name for t in tools]:
            raise bad(
                f"'tool_choice' names no function of 'tools' ({', '.join(t.name for t in tools)})"[:200],
                "tool_choice",
            )
    elif choice not in ("none", "auto", "required"):
        raise bad(
            '\'tool_choice\' must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
            "tool_choice",
        )
    return Tools(tuple(tools), choice)


def with_tools(parsed: Parsed, body: dict[str, Any]) -> Tools | None:
    """The request's tools (None without), with a forced call's guide put into its sampling; 400 for what cannot
    go with tools."""
    check_messages(body.get("messages") or [])
    tools = parse_tools(body)
    if tools is None:
        if any(m.get("tool_calls") or m.get("role") == "tool" for m in parsed.messages or []):
            return Tools((), "none")  # earlier calls to render, none to make
        return None
    if tools.active and parsed.params.get("logprobs") is not None:
        raise bad("'logprobs' cannot be used with 'tools' (unless tool_choice is \"none\")", "logprobs")
    if tools.forced:
        if parsed.params.get("guide") is not None:
            raise bad(
                "a forced tool_choice guides the answer already: give 'tool_choice' or 'response_format' (or "
                "guided_json, guided_choice), not both",
                "tool_choice",
            )
        parsed.params["guide"] = tools.grammar()
    return tools


def check_messages(raw: list[Any]) -> None:
    """The tool parts of chat messages: an assistant's `tool_calls`, a tool message's content."""
    for i, m in enumerate(raw):
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        if calls is None:
            continue
        ok = isinstance(calls, list) and all(
            isinstance(c, dict)
            and isinstance(c.get("function"), dict)
            and isinstance(c["function"].get("name"), str)
            and isinstance(c["function"].get("arguments", "{}"), str | dict)
            for c in calls
        )
        if not ok or m.get("role") != "assistant":
            raise bad(
                f"messages[{i}].tool_calls must be an assistant's list of "
                '{"id", "type": "function", "function": {"name", "arguments"}}',
                f"messages[{i}].tool_calls",
            )


class ToolStream:
    """One streamed choice's text when answers may be tool calls: text passes as content as soon as it cannot
    become a call; `finish` says what the held text is."""

    def __init__(self, tools: Tools) -> None:
        self.tools = tools
        self.held = ""
        self.passing = False

    def feed(self, text: str) -> str:
        """The content to send now."""
        if self.passing:
            return text
        self.held += text
        s = self.held.lstrip()
        if self.tools.forced or not s or s.startswith(HOLD) or any(h.startswith(s) for h in HOLD):
            return ""
        self.passing, out, self.held = True, self.held, ""
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """(content still to send, the calls the answer made)."""
        calls = [] if self.passing else self.tools.calls_of(self.held)
        return ("", calls) if calls else (self.held, [])


__all__ = ["Tool", "ToolStream", "Tools", "check_messages", "parse_tools", "with_tools"]
