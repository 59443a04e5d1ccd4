"""Read training files. Each record is one example in one of lorakit's three shapes:

- `{"prompt": ..., "completion": ...}`  (loss on the completion by default)
- `{"messages": [{"role": ..., "content": ...}, ...]}`  (loss on assistant turns by default; OpenAI's
  `"weight": 0` on an assistant message leaves that message unlearned)
- `{"text": ...}`  (loss on everything)

or in another tool's shape that is rewritten into messages as it is read (`lorakit.data.shapes`: Alpaca and
ShareGPT as LLaMA-Factory reads them, TRL's conversational prompt/completion). Files are JSON Lines, JSON arrays,
CSV/TSV, Parquet or Arrow, or `datasets` folders (`lorakit.data.files`). All records of a file have one shape.
Errors name the file and the line (or record, or row).
"""

from __future__ import annotations

import json
import os
from typing import Any

from lorakit.data.files import DataError, parse_records, read_records
from lorakit.data.shapes import NATIVE, as_native, check_fields, renamed
from lorakit.data.shapes import shape_of as any_shape

SHAPES = NATIVE
ROLES = {"system", "user", "assistant", "tool"}

__all__ = [
    "DataError",
    "SHAPES",
    "check_example",
    "parse_examples",
    "parse_jsonl",
    "read_examples",
    "read_jsonl",
    "shape_of",
]


def shape_of(example: dict[str, Any]) -> str | None:
    """'prompt_completion', 'messages' or 'text' (lorakit's own shapes), or None if the keys fit none."""
    shape = any_shape(example)  # lorakit's own shapes are tried first
    return shape if shape in SHAPES else None


def read_examples(path: str | os.PathLike, fields: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """All examples of a data file (JSONL, JSON, CSV, TSV, Parquet or Arrow, or a `datasets` folder),
    validated, in lorakit's shapes. `fields` renames the file's columns first ({lorakit's key: the file's
    column}). Raises DataError naming the file and the line; also for records of KTO's feedback (a boolean
    'label' or a 'kto_tag'), whose undesirable answers supervised fine-tuning would learn."""
    check_fields(fields, str(path))
    return examples_of(_not_feedback(read_records(path), fields or {}), str(path), fields or {})


def parse_examples(data: bytes, source: str, fields: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """All examples of a data file's bytes, read as `source`'s suffix says; see `read_examples`."""
    check_fields(fields, source)
    return examples_of(_not_feedback(parse_records(data, source), fields or {}), source, fields or {})


def _not_feedback(records: list[tuple[str, Any]], fields: dict[str, str]) -> list[tuple[str, Any]]:
    """`records`, unless one is KTO's feedback (`lorakit.data.feedback`): DataError naming it."""
    label = fields.get("label", "label")
    for where, record in records:
        if isinstance(record, dict) and ("kto_tag" in record or isinstance(record.get(label), bool)):
            key = "kto_tag" if "kto_tag" in record else label
            raise DataError(
                f"{where}: {key!r} marks an answer desirable or not (KTO's feedback), which supervised "
                "fine-tuning would learn either way: train it with train.objective kto, or drop the column"
            )
    return records


read_jsonl = read_examples
parse_jsonl = parse_examples


def examples_of(records: list[tuple[str, Any]], source: str, fields: dict[str, str]) -> list[dict[str, Any]]:
    """The examples of a file's records ((where, record) pairs, as `lorakit.data.files` reads them), validated."""
    examples: list[dict[str, Any]] = []
    shape: str | None = None
    for where, ex in records:
        if not isinstance(ex, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(ex).__name__}")
        ex = renamed(ex, fields, where)
        this = any_shape(ex)
        if this is None:
            raise DataError(
                f'{where}: unknown fields {sorted(ex)}; expected {{"prompt","completion"}}, {{"messages"}}, '
                f'{{"text"}}, Alpaca\'s {{"instruction","output"}} or ShareGPT\'s {{"conversations"}} (data.fields '
                "renames columns)"
            )
        if shape is not None and this != shape:
            raise DataError(f"{where}: a {this} example in a file of {shape} examples")
        shape = this
        native = as_native(ex, this, where)
        check_example(native, shape_of(native) or this, where)
        examples.append(native)
    if not examples:
        raise DataError(f"{source}: no examples (the file is empty)")
    return examples


def check_example(ex: dict[str, Any], shape: str, where: str) -> None:
    """DataError naming `where` unless `ex` is a valid example of lorakit's `shape`."""
    if shape == "messages":
        msgs = ex["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        offered = {t["name"] for t in ex.get("tools", ())}
        for i, m in enumerate(msgs):
            calls = m.get("tool_calls") if isinstance(m, dict) else None
            if (
                not isinstance(m, dict)
                or not (isinstance(m.get("content"), str) or (calls and m.get("content") is None))
                or not _is_role(m.get("role"))
            ):
                raise DataError(
                    f"{where}: messages[{i}] needs a 'role' in {sorted(ROLES)} and a string 'content' (or an "
                    "assistant's 'tool_calls')"
                )
            if calls is not None:
                _check_calls(calls, m["role"], offered, f"{where}: messages[{i}]")
            if "weight" in m and (
                m["weight"] not in (0, 1) or isinstance(m["weight"], float) or m["role"] != "assistant"
            ):
                raise DataError(
                    f"{where}: messages[{i}]: 'weight' is 0 or 1, on assistant messages (OpenAI's rule), got "
                    f"{m['weight']!r} on a {m['role']} message"
                )
        if not any(m["role"] == "assistant" and m.get("weight", 1) for m in msgs):
            raise DataError(f"{where}: no assistant message to learn from")
    else:
        for k in SHAPES[shape]:
            if not isinstance(ex[k], str):
                raise DataError(f"{where}: {k!r} must be a string, got {type(ex[k]).__name__}")


def _check_calls(calls: Any, role: str, offered: set[str], where: str) -> None:
    """An assistant's `tool_calls`: OpenAI's [{"type": "function", "function": {"name", "arguments"}}], the
    arguments an object or its JSON text, each naming a function the record offers (where it offers any)."""
    shape = '[{"type": "function", "function": {"name": ..., "arguments": {...}}}]'
    if role != "assistant" or not isinstance(calls, list) or not calls:
        raise DataError(f"{where}: 'tool_calls' must be an assistant's non-empty list {shape}")
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise DataError(f"{where}: 'tool_calls' must be {shape}")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = None
        if not isinstance(args, dict):
            raise DataError(f"{where}: the arguments of {fn['name']!r} must be an object, or its JSON text")
        if offered and fn["name"] not in offered:
            raise DataError(
                f"{where}: calls {fn['name']!r}, which the record's 'tools' do not offer: {sorted(offered)}"
            )


def _is_role(role: Any) -> bool:
    return isinstance(role, str) and role in ROLES
