"""The data formats of other tools, rewritten into lorakit's own shapes as records are read.

lorakit trains on three shapes (`lorakit.data.jsonl`): `{"prompt", "completion"}`, `{"messages"}` (OpenAI's chat
format: a `"weight": 0` on an assistant message leaves it unlearned, as in OpenAI's fine-tuning files) and
`{"text"}`. These are read too, each record becoming `{"messages": [...]}`:

| shape | a record | its messages |
|---|---|---|
| `alpaca` (LLaMA-Factory, Stanford Alpaca) | `instruction`, `input` (optional), `output`, `system` and `history` (`[[query, answer], ...]`) optional | the system prompt, each history pair as a user and an assistant turn, then the user's `instruction` and `input` joined by a newline (LLaMA-Factory's rule) and the assistant's `output` |
| `sharegpt` (LLaMA-Factory, FastChat) | `conversations`: `[{"from": "human" \\| "gpt" \\| "system" \\| "function_call" \\| "observation", "value": ...}]` (or `role`/`content` entries), `system` and `tools` optional | one message per entry: human and user are user turns; gpt, assistant, chatgpt and model assistant turns; function_call an assistant's calls, observation a tool message |
| conversational prompt/completion (TRL) | `prompt` and `completion` as lists of messages | the prompt's messages, then the completion's; only the completion's assistant turns are learned |

Every assistant turn is learned (LLaMA-Factory's default, `mask_history: false`) unless a weight says otherwise.
Tool calls: a record's `tools` (the functions offered: OpenAI's `[{"type": "function", "function": {...}}]`, bare
function specs, or their JSON text, as LLaMA-Factory stores them) is kept as a list of specs; ShareGPT's
`function_call` turns (`{"name", "arguments"}` as JSON text, or a list of them) become an assistant's
`tool_calls`, and `observation` turns `tool` messages (`lorakit.data.toolcalls` renders them for the template).
`fields` renames a file's columns first, e.g. `{"prompt": "question", "completion": "answer"}`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import yaml

from lorakit.data.files import DataError
from lorakit.data.toolcalls import function_spec

NATIVE = {"prompt_completion": ("prompt", "completion"), "messages": ("messages",), "text": ("text",)}
"""lorakit's own shapes and the keys that make each."""
FOREIGN = {"alpaca": ("instruction", "output"), "sharegpt": ("conversations",)}
"""The other tools' shapes that are rewritten into messages, and the keys that make each."""
FIELDS = tuple(
    dict.fromkeys(
        k
        for keys in (
            *NATIVE.values(),
            *FOREIGN.values(),
            ("input", "system", "history", "tools", "chosen", "rejected", "label", "text_pair", "margin"),
            ("tokens", "tags", "entities"),  # token classification's (lorakit.data.tagging)
            ("anchor", "positive", "negative", "score"),  # an embedding model's (lorakit.data.textpairs)
        )
        for k in keys
    )
)
"""The keys `fields` may map a file's columns to."""

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "system": "system",
    "function_call": "function_call",  # an assistant's calls (LLaMA-Factory's tags)
    "observation": "tool",  # their results
    "tool": "tool",
}
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for a function's name


def fields_problem(fields: Any) -> str | None:
    """Why `fields` is not a mapping of lorakit's keys to column names, or None."""
    if not isinstance(fields, dict):
        return f"must map lorakit's keys to column names, e.g. {{prompt: question}}, got {fields!r}"
    for ours, theirs in fields.items():
        if ours not in FIELDS:
            return f"maps {ours!r}, which is none of lorakit's keys {list(FIELDS)}"
        if not isinstance(theirs, str) or not theirs:
            return f"must name a column for {ours!r} (a non-empty string), got {theirs!r}"
    if len(set(fields.values())) != len(fields):
        return f"maps two keys to one column: {fields!r}"
    return None


def check_fields(fields: Any, source: str) -> None:
    """DataError naming `source` unless `fields` (data.fields; None: none) maps lorakit's keys to column names."""
    problem = None if fields is None else fields_problem(fields)
    if problem:
        raise DataError(f"{source}: data.fields {problem}")


def parse_fields(value: Any) -> dict[str, str]:
    """data.fields as a command line or a form gives it (YAML text) or as a mapping; {} for none. ValueError
    saying what is wrong (the text `fields_problem` gives)."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ValueError(f"is not YAML: {str(e).splitlines()[0]}") from None
    problem = fields_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def renamed(record: dict[str, Any], fields: dict[str, str], where: str) -> dict[str, Any]:
    """The record with its columns renamed to lorakit's keys (`fields`: ours -> theirs)."""
    if not fields:
        return record
    missing = [theirs for theirs in fields.values() if theirs not in record]
    if missing:
        ours = next(o for o, t in fields.items() if t == missing[0])
        raise DataError(
            f"{where}: no column {missing[0]!r} (data.fields maps {ours!r} to it); has {sorted(record)}"
        )
    taken = {theirs for theirs in fields.values()}
    out = {k: v for k, v in record.items() if k not in taken and k not in fields}
    out.update({ours: record[theirs] for ours, theirs in fields.items()})
    return out


def named_records(
    records: list[tuple[str, Any]], source: str, fields: dict[str, str]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record with its columns renamed to lorakit's keys) of each record of a file as read; DataError for
    a file without records and for a record that is not an object, naming it."""
    if not records:
        raise DataError(f"{source}: no examples (the file is empty)")
    for where, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, renamed(record, fields, where)


def shape_of(record: dict[str, Any]) -> str | None:
    """The record's shape: one of NATIVE's or FOREIGN's names, or None if its keys fit none."""
    for name, keys in {**NATIVE, **FOREIGN}.items():
        if all(k in record for k in keys):
            return name
    return None


def as_native(record: dict[str, Any], shape: str, where: str) -> dict[str, Any]:
    """The record in one of lorakit's own shapes (a native record is returned as it is)."""
    tools = _tools(record.get("tools"), where) if shape != "text" else []
    offered = {"tools": tools} if tools else {}
    if shape == "alpaca":
        return {"messages": _alpaca(record, where)} | offered
    if shape == "sharegpt":
        return {"messages": _sharegpt(record, where)} | offered
    if shape == "prompt_completion" and isinstance(record["prompt"], list):  # TRL's conversational prompt
        msgs = _conversational(record, where)
        return {"messages": [_message(m, i, where) for i, m in enumerate(msgs)]} | offered
    if shape == "messages" and isinstance(record["messages"], list):
        rest = {k: v for k, v in record.items() if k != "tools"}
        return (
            rest | {"messages": [_message(m, i, where) for i, m in enumerate(record["messages"])]} | offered
        )
    return record


def _tools(value: Any, where: str) -> list[dict[str, Any]]:
    """A record's functions offered, as specs {"name", "description"?, "parameters"?}; [] for none."""
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise DataError(f"{where}: 'tools' is text that is not JSON") from None
    if not isinstance(value, list):
        raise DataError(f"{where}: 'tools' must be a list of functions, got {type(value).__name__}")
    specs = []
    for i, t in enumerate(value):
        spec = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else t
        if not isinstance(spec, dict):
            raise DataError(f"{where}: tools[{i}] must be a function (an object)")
        name = spec.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.match(name):
            raise DataError(
                f"{where}: tools[{i}]'s name must be 1 to 64 letters, digits, _ or -, got {name!r}"
            )
        if not isinstance(spec.get("parameters") or {}, dict) or not isinstance(
            spec.get("description") or "", str
        ):
            raise DataError(
                f"{where}: tools[{i}] ({name}): 'parameters' must be an object, 'description' a string"
            )
        if name in (s["name"] for s in specs):
            raise DataError(f"{where}: tools[{i}]: the function {name!r} is listed twice")
        specs.append(function_spec(spec))  # as lorakit serve describes a request's
    return specs


def _message(m: Any, i: int, where: str) -> Any:
    """A message without the keys Parquet gives as None where a row lacks them, and with OpenAI's content parts
    (`[{"type": "text", "text": ...}]`) as one text, joined as `lorakit serve` joins them."""
    if not isinstance(m, dict):
        return m  # named by the check
    m = {k: v for k, v in m.items() if v is not None or k == "content"}
    content = m.get("content")
    if isinstance(content, list):
        kinds = [p.get("type") if isinstance(p, dict) else type(p).__name__ for p in content]
        if any(k != "text" for k in kinds) or not all(isinstance(p.get("text"), str) for p in content):
            other = next((k for k in kinds if k != "text"), "text")
            raise DataError(
                f"{where}: messages[{i}] has a {other!r} content part: lorakit trains on text parts only"
            )
        m["content"] = "".join(p["text"] for p in content)
    return m


def _given(record: dict[str, Any], key: str, where: str) -> str | None:
    """An optional text column: None when absent, null or empty."""
    value = record.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _text(record: dict[str, Any], key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _alpaca(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    msgs = []
    system = _given(record, "system", where)
    if system is not None:
        msgs.append({"role": "system", "content": system})
    history = record.get("history")
    if history not in (None, ""):
        if not isinstance(history, list) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(s, str) for s in p)
            for p in history
        ):
            raise DataError(f"{where}: 'history' must be a list of [query, answer] string pairs")
        for query, answer in history:
            msgs += [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
    query = "\n".join(t for t in (_text(record, "instruction", where), _given(record, "input", where)) if t)
    return msgs + [
        {"role": "user", "content": query},
        {"role": "assistant", "content": _text(record, "output", where)},
    ]


def _sharegpt(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list")
    msgs = []
    system = _given(record, "system", where)
    if system is not None:
        msgs.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: conversations[{i}] must be an object, got {type(turn).__name__}")
        role, content = (
            (turn.get("from"), turn.get("value"))
            if "from" in turn
            else (turn.get("role"), turn.get("content"))
        )
        if not isinstance(role, str) or role not in SHAREGPT_ROLES or not isinstance(content, str):
            raise DataError(
                f"{where}: conversations[{i}] needs a 'from' in {sorted(SHAREGPT_ROLES)} and a string 'value' "
                "(or 'role' and 'content')"
            )
        if SHAREGPT_ROLES[role] == "function_call":
            msgs.append(
                {"role": "assistant", "content": None, "tool_calls": _sharegpt_calls(content, i, where)}
            )
        else:
            msgs.append({"role": SHAREGPT_ROLES[role], "content": content})
    return msgs


def _sharegpt_calls(text: str, i: int, where: str) -> list[dict[str, Any]]:
    """A function_call turn's value (`{"name", "arguments"}` as JSON text, or a list of them) as OpenAI's calls."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    calls = value if isinstance(value, list) else [value]
    if not calls or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        raise DataError(
            f'{where}: conversations[{i}]: a function_call\'s value must be {{"name": ..., "arguments": {{...}}}} '
            "as JSON text (or a list of them)"
        )
    return [
        {"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}}
        for c in calls
    ]


def _conversational(record: dict[str, Any], where: str) -> list[dict[str, Any]]:
    prompt, completion = record["prompt"], record["completion"]
    if not isinstance(completion, list) or not completion:
        raise DataError(
            f"{where}: a 'prompt' of messages needs a 'completion' of messages (a non-empty list)"
        )
    if not all(isinstance(m, dict) for m in prompt + completion):
        raise DataError(f"{where}: 'prompt' and 'completion' must be lists of messages (objects)")
    unlearned = [{**m, "weight": 0} if m.get("role") == "assistant" else m for m in prompt]
    if not any(m.get("role") == "assistant" for m in completion):
        raise DataError(f"{where}: the 'completion' has no assistant message to learn from")
    return unlearned + list(completion)
