"""Read JSONL training files. Each line is one example in one of three shapes:

- `{"prompt": ..., "completion": ...}`  (loss on the completion by default)
- `{"messages": [{"role": ..., "content": ...}, ...]}`  (loss on assistant turns by default)
- `{"text": ...}`  (loss on everything)

Errors name the file and the line number.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

SHAPES = {"prompt_completion": ("prompt", "completion"), "messages": ("messages",), "text": ("text",)}
ROLES = {"system", "user", "assistant", "tool"}


class DataError(LorakitError, ValueError):
    """A data file is missing, empty or malformed."""


def shape_of(example: dict[str, Any]) -> str | None:
    """'prompt_completion', 'messages' or 'text', or None if the keys fit no shape."""
    for name, keys in SHAPES.items():
        if all(k in example for k in keys):
            return name
    return None


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All examples of a JSONL file, validated. Raises DataError naming the file and line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file ({'a folder' if path.is_dir() else 'a special file'})")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    return parse_jsonl(data, str(path))


def parse_jsonl(data: bytes, source: str) -> list[dict[str, Any]]:
    """All examples of JSONL bytes, validated. Raises DataError naming `source` and the line ("x.jsonl:3: ...")."""
    examples: list[dict[str, Any]] = []
    shape: str | None = None
    path = source
    for lineno, raw in enumerate(
        data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), 1
    ):  # a BOM (Notepad) is fine
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path}:{lineno}: not valid UTF-8 text (byte {e.start + 1} of the line)"
            ) from None
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(ex, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(ex).__name__}")
        this = shape_of(ex)
        if this is None:
            raise DataError(
                f'{path}:{lineno}: unknown fields {sorted(ex)}; expected {{"prompt","completion"}}, '
                '{"messages"} or {"text"}'
            )
        if shape is not None and this != shape:
            raise DataError(f"{path}:{lineno}: a {this} example in a file of {shape} examples")
        shape = this
        _check(ex, this, f"{path}:{lineno}")
        examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples


def _check(ex: dict[str, Any], shape: str, where: str) -> None:
    if shape == "messages":
        msgs = ex["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("content"), str)
                or not _is_role(m.get("role"))
            ):
                raise DataError(
                    f"{where}: messages[{i}] needs a 'role' in {sorted(ROLES)} and a string 'content'"
                )
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: no assistant message to learn from")
    else:
        for k in SHAPES[shape]:
            if not isinstance(ex[k], str):
                raise DataError(f"{where}: {k!r} must be a string, got {type(ex[k]).__name__}")


def _is_role(role: Any) -> bool:
    return isinstance(role, str) and role in ROLES
