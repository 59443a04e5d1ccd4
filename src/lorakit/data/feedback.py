"""Unpaired feedback, for KTO: one answer to a prompt, marked desirable or not (a thumbs up or down).

A file's records are examples of any shape supervised fine-tuning reads (`lorakit.data.jsonl`: prompt and
completion, messages, Alpaca, ShareGPT; TRL's conversational prompt and completion), each with one more key saying
whether its answer is desirable:

| key | from | values |
|---|---|---|
| `label` | TRL's unpaired preference format | true or false (a CSV's `true`/`false`/`1`/`0` too) |
| `kto_tag` | LLaMA-Factory's KTO datasets | the same |

`data.fields` can map `label` to a column of another name. A file of preference pairs (`lorakit.data.preference`,
any of its shapes) is read as feedback too: each pair gives its chosen answer as desirable and its rejected one
as undesirable (TRL's `unpair_preference_dataset`), all the chosen answers first, so that rows next to each other
rarely share a prompt.

The label rates the example's answer: its completion, or its last assistant turn (a conversation's earlier
assistant turns are the prompt's, not learned, as the turns before a pair's answers are). That answer is what KTO
scores, as the pairs' objectives score each side of a pair.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from lorakit.data.files import DataError, parse_records, read_records
from lorakit.data.jsonl import examples_of
from lorakit.data.preference import is_pair, pairs_of
from lorakit.data.shapes import check_fields, renamed
from lorakit.data.tokenize import IGNORE, Encoded, encode_example

LABEL_KEYS = ("label", "kto_tag")
"""The keys that mark a record's answer desirable or not, in the order they are looked for."""
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")

__all__ = ["LABEL_KEYS", "Feedback", "encode_feedback", "parse_feedback", "read_feedback", "unpaired"]


def read_feedback(path: str | os.PathLike, fields: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """All feedback of a data file (JSONL, JSON, CSV, TSV, Parquet or Arrow, or a `datasets` folder) as
    {"example": example, "desirable": bool}, validated; a file of preference pairs gives two items per pair.
    `fields` renames the file's columns first. DataError naming the file and the record."""
    check_fields(fields, str(path))
    return _feedback(read_records(path), str(path), fields or {})


def parse_feedback(data: bytes, source: str, fields: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """`read_feedback` of a file's bytes, read as `source`'s suffix says."""
    check_fields(fields, source)
    return _feedback(parse_records(data, source), source, fields or {})


def unpaired(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Preference pairs ({"chosen", "rejected"} examples) as feedback: every chosen answer desirable, then every
    rejected one undesirable."""
    return [{"example": p["chosen"], "desirable": True} for p in pairs] + [
        {"example": p["rejected"], "desirable": False} for p in pairs
    ]


def _feedback(records: list[tuple[str, Any]], source: str, fields: dict[str, str]) -> list[dict[str, Any]]:
    if not records:
        raise DataError(f"{source}: no feedback (the file is empty)")
    where, first = records[0]
    if isinstance(first, dict) and is_pair(renamed(first, fields, where)):
        return unpaired(pairs_of(records, source, fields))
    labels, rest = [], []
    for where, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        record = renamed(record, fields, where)
        key = next((k for k in LABEL_KEYS if k in record), None)
        if key is None:
            raise DataError(
                f"{where}: no label; KTO needs each example's 'label' (true: a desirable answer, false: not; "
                f"LLaMA-Factory's 'kto_tag' too), or preference pairs; has {sorted(record)}"
            )
        labels.append(_label(record[key], key, where))
        rest.append((where, {k: v for k, v in record.items() if k != key}))
    examples = examples_of(rest, source, {})
    return [
        {"example": _last_answer(ex), "desirable": label} for ex, label in zip(examples, labels, strict=True)
    ]


def _last_answer(example: dict[str, Any]) -> dict[str, Any]:
    """A conversation with only its last assistant turn learned (the one the label rates); other shapes as given."""
    msgs = example.get("messages")
    if not isinstance(msgs, list):
        return example
    last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=-1)
    turns = [
        {**m, "weight": 0} if m.get("role") == "assistant" and i != last else m for i, m in enumerate(msgs)
    ]
    return {**example, "messages": turns}


def _label(value: Any, key: str, where: str) -> bool:
    """A label as true or false: a boolean, 0 or 1, or their text (a CSV's cells are text)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise DataError(f"{where}: {key!r} must be true or false, got {value!r}")


@dataclass
class Feedback:
    """A tokenized feedback row: the prompt and answer's ids, labels on the answer only, and whether the answer
    is desirable."""

    row: Encoded
    desirable: bool

    @property
    def answer_start(self) -> int:
        """The index of the answer's first token (the first learned label)."""
        return next(i for i, label in enumerate(self.row.labels) if label != IGNORE)


def mismatched(prompt: Feedback, answer: Feedback, max_len: int) -> Encoded:
    """`prompt`'s prompt followed by `answer`'s answer, labels on the answer: a row of KTO's KL estimate (the
    answer scored after a prompt it was not given for), cut to `max_len` tokens."""
    p, a = prompt.answer_start, answer.answer_start
    ids = prompt.row.input_ids[:p] + answer.row.input_ids[a:]
    labels = [IGNORE] * p + answer.row.labels[a:]
    return Encoded(ids[:max_len], labels[:max_len])


def encode_feedback(
    tokenizer, items: list[dict[str, Any]], *, max_len: int, chat: bool = True
) -> tuple[list[Feedback], dict[str, int]]:
    """Tokenize feedback (`lorakit.data.tokenize.encode_example`). Also returns counts: rows, desirable,
    undesirable (of those kept), truncated, tokens, learned_tokens, dropped (no answer token left)."""
    out: list[Feedback] = []
    stats = {"rows": len(items), "desirable": 0, "undesirable": 0, "truncated": 0, "tokens": 0}
    stats |= {"learned_tokens": 0, "dropped": 0}
    for item in items:
        row = encode_example(tokenizer, item["example"], max_len=max_len, chat=chat)
        stats["truncated"] += row.truncated
        if all(label == IGNORE for label in row.labels[1:]):
            stats["dropped"] += 1
            continue
        stats["desirable" if item["desirable"] else "undesirable"] += 1
        stats["tokens"] += len(row.input_ids)
        stats["learned_tokens"] += sum(label != IGNORE for label in row.labels[1:])
        out.append(Feedback(row, bool(item["desirable"])))
    return out, stats
