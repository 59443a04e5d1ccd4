"""Preference pairs, for DPO, SimPO, ORPO and CPO: a prompt, the answer to prefer (`chosen`) and the answer to
avoid (`rejected`).

A file's records are in one of these shapes (the first that fits is taken, all records of a file in one):

| shape | a record |
|---|---|
| `openai` (OpenAI's preference fine-tuning) | `input: {"messages": [...], "tools"?}`, `preferred_output` and `non_preferred_output` (lists of assistant messages) |
| `alpaca` (LLaMA-Factory) | `instruction`, `input`, `system` and `history` optional (as for SFT), `chosen` and `rejected` texts |
| `sharegpt` (LLaMA-Factory) | `conversations` (ending with the user's turn), `chosen` and `rejected` turns (`{"from": "gpt", "value"}`), `system` and `tools` optional |
| `explicit` (TRL) | `prompt`, `chosen`, `rejected`: three texts, or three lists of messages (the conversation so far, then each answer's assistant turns) |
| `implicit` (TRL) | `chosen` and `rejected`: two whole conversations; the messages they start with in common are the prompt |

Each pair becomes two examples of lorakit's own shapes (`lorakit.data.jsonl`), the prompt with each answer:
`{"prompt", "completion"}` for texts, `{"messages"}` for conversations, whose earlier assistant turns carry
`"weight": 0`. So both sides are tokenized exactly as supervised fine-tuning tokenizes (the chat template, tool
calls), and the labels mark the answer's tokens only: the log-probabilities DPO compares.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from lorakit.data.files import DataError, parse_records, read_records
from lorakit.data.jsonl import check_example, examples_of, shape_of
from lorakit.data.shapes import as_native, check_fields, renamed
from lorakit.data.shapes import shape_of as any_shape
from lorakit.data.tokenize import IGNORE, Encoded, encode_example

PAIR_SHAPES = {
    "openai": ("input", "preferred_output", "non_preferred_output"),
    "alpaca": ("instruction", "chosen", "rejected"),
    "sharegpt": ("conversations", "chosen", "rejected"),
    "explicit": ("prompt", "chosen", "rejected"),
    "implicit": ("chosen", "rejected"),
}
"""The shapes of a preference record and the keys that make each, in the order they are tried."""

__all__ = [
    "PAIR_SHAPES",
    "Pair",
    "encode_pairs",
    "is_pair",
    "pair_shape",
    "pairs_of",
    "parse_any",
    "parse_pairs",
    "read_any",
    "read_pairs",
]


def pair_shape(record: dict[str, Any]) -> str | None:
    """The record's preference shape (a key of PAIR_SHAPES), or None if it is not a preference pair."""
    return next((name for name, keys in PAIR_SHAPES.items() if all(k in record for k in keys)), None)


def is_pair(record: Any) -> bool:
    return isinstance(record, dict) and pair_shape(record) is not None


def read_pairs(path: str | os.PathLike, fields: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """All preference pairs of a data file (JSONL, JSON, CSV, TSV, Parquet or Arrow, or a `datasets` folder)
    as {"chosen": example, "rejected": example}, validated. `fields` renames the file's columns first.
    DataError naming the file and the record."""
    check_fields(fields, str(path))
    return pairs_of(read_records(path), str(path), fields or {})


def parse_pairs(data: bytes, source: str, fields: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """`read_pairs` of a file's bytes, read as `source`'s suffix says."""
    check_fields(fields, source)
    return pairs_of(parse_records(data, source), source, fields or {})


def read_any(
    path: str | os.PathLike, fields: dict[str, str] | None = None
) -> tuple[list[dict[str, Any]], bool]:
    """(the file's items, whether they are preference pairs): pairs when its first record is one (`read_pairs`),
    else examples (`lorakit.data.jsonl.read_examples`). For a tool that takes either (the playground)."""
    check_fields(fields, str(path))
    return _any(read_records(path), str(path), fields or {})


def parse_any(
    data: bytes, source: str, fields: dict[str, str] | None = None
) -> tuple[list[dict[str, Any]], bool]:
    """`read_any` of a file's bytes, read as `source`'s suffix says."""
    check_fields(fields, source)
    return _any(parse_records(data, source), source, fields or {})


def _any(
    records: list[tuple[str, Any]], source: str, fields: dict[str, str]
) -> tuple[list[dict[str, Any]], bool]:
    if records and isinstance(records[0][1], dict) and is_pair(renamed(records[0][1], fields, records[0][0])):
        return pairs_of(records, source, fields), True
    return examples_of(records, source, fields), False


def pairs_of(records: list[tuple[str, Any]], source: str, fields: dict[str, str]) -> list[dict[str, Any]]:
    """The preference pairs of a file's records ((where, record) pairs, as `lorakit.data.files` reads them),
    validated, as {"chosen": example, "rejected": example}."""
    pairs: list[dict[str, Any]] = []
    shape: str | None = None
    for where, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        record = renamed(record, fields, where)
        this = pair_shape(record)
        if this is None:
            sft = (
                " (an example for supervised fine-tuning: train it with train.objective sft)"
                if any_shape(record)
                else ""
            )
            raise DataError(
                f'{where}: not a preference pair{sft}; expected {{"prompt","chosen","rejected"}}, '
                f'{{"chosen","rejected"}} conversations, Alpaca\'s {{"instruction","chosen","rejected"}}, '
                f'ShareGPT\'s {{"conversations","chosen","rejected"}} or OpenAI\'s '
                f'{{"input","preferred_output","non_preferred_output"}}; has {sorted(record)}'
            )
        if shape is not None and this != shape:
            raise DataError(f"{where}: a pair of shape {this} in a file of {shape} pairs")
        shape = this
        pairs.append(as_pair(record, this, where))
    if not pairs:
        raise DataError(f"{source}: no preference pairs (the file is empty)")
    return pairs


def as_pair(record: dict[str, Any], shape: str, where: str) -> dict[str, Any]:
    """A preference record of `shape` as {"chosen": example, "rejected": example}, both checked; with the record's
    "margin" (how much better the chosen answer is: a reward model's margin, TRL's column) where it has one."""
    out = {}
    for side, key in _SIDES[shape]:
        example = _SIDE[shape](record, key, where)
        check_example(example, shape_of(example) or "messages", f"{where}: {side}")
        out[side] = example
    if record.get("margin") is not None:
        margin = record["margin"]
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise DataError(f"{where}: 'margin' must be a finite number, got {margin!r}")
        out["margin"] = float(margin)
    return out


_SIDES = {
    "openai": (("chosen", "preferred_output"), ("rejected", "non_preferred_output")),
    **{
        s: (("chosen", "chosen"), ("rejected", "rejected"))
        for s in ("alpaca", "sharegpt", "explicit", "implicit")
    },
}


def _answer_messages(value: Any, key: str, where: str) -> list[dict[str, Any]]:
    """An answer given as assistant messages (a list, or one message)."""
    msgs = [value] if isinstance(value, dict) else value
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        raise DataError(f"{where}: {key!r} must be a list of assistant messages")
    if not any(m.get("role") == "assistant" for m in msgs):
        raise DataError(f"{where}: {key!r} has no assistant message")
    return msgs


def _conversation(prompt: list[Any], answer: list[dict[str, Any]], tools: Any, where: str) -> dict[str, Any]:
    """The messages example of `prompt` then `answer`: the prompt's assistant turns unlearned."""
    if not isinstance(prompt, list) or not all(isinstance(m, dict) for m in prompt):
        raise DataError(f"{where}: the prompt must be a list of messages (objects)")
    unlearned = [{**m, "weight": 0} if m.get("role") == "assistant" else m for m in prompt]
    record = {"messages": unlearned + answer} | ({"tools": tools} if tools not in (None, "", []) else {})
    return as_native(record, "messages", where)


def _openai(record: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    given = record["input"]
    if not isinstance(given, dict) or not isinstance(given.get("messages"), list):
        raise DataError(f"{where}: 'input' must be an object with 'messages' (OpenAI's preference format)")
    return _conversation(
        given["messages"], _answer_messages(record[key], key, where), given.get("tools"), where
    )


def _explicit(record: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    prompt, answer = record["prompt"], record[key]
    if isinstance(prompt, str):
        if not isinstance(answer, str):
            raise DataError(f"{where}: a text 'prompt' needs a text {key!r}, got {type(answer).__name__}")
        return {"prompt": prompt, "completion": answer}
    return _conversation(prompt, _answer_messages(answer, key, where), record.get("tools"), where)


def _implicit(record: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    chosen, rejected = record["chosen"], record["rejected"]
    if not all(isinstance(c, list) and c and all(isinstance(m, dict) for m in c) for c in (chosen, rejected)):
        raise DataError(
            f"{where}: without a 'prompt', 'chosen' and 'rejected' must be whole conversations (lists of "
            "messages); texts need a 'prompt'"
        )
    common = 0
    while common < min(len(chosen), len(rejected)) and chosen[common] == rejected[common]:
        common += 1
    mine = record[key]
    return _conversation(
        mine[:common], _answer_messages(mine[common:], key, where), record.get("tools"), where
    )


def _alpaca(record: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    answer = record[key]
    if not isinstance(answer, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(answer).__name__}")
    rest = {k: v for k, v in record.items() if k not in ("chosen", "rejected")}
    msgs = as_native({**rest, "output": answer}, "alpaca", where)["messages"]
    return {"messages": _only_last_learned(msgs)}


def _sharegpt(record: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    answer = record[key]
    if isinstance(answer, str):
        answer = {"from": "gpt", "value": answer}
    if not isinstance(answer, dict):
        raise DataError(f'{where}: {key!r} must be a turn {{"from": "gpt", "value": ...}}')
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise DataError(f"{where}: 'conversations' must be a non-empty list")
    rest = {k: v for k, v in record.items() if k not in ("chosen", "rejected", "conversations")}
    native = as_native({**rest, "conversations": [*turns, answer]}, "sharegpt", where)
    if native["messages"][-1]["role"] != "assistant":
        raise DataError(f"{where}: {key!r} must be the assistant's turn (from gpt or assistant)")
    return native | {"messages": _only_last_learned(native["messages"])}


def _only_last_learned(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**m, "weight": 0} if m["role"] == "assistant" else m for m in msgs[:-1]] + msgs[-1:]


_SIDE = {
    "openai": _openai,
    "alpaca": _alpaca,
    "sharegpt": _sharegpt,
    "explicit": _explicit,
    "implicit": _implicit,
}


@dataclass
class Pair:
    """A tokenized preference pair: each side's ids, with labels on its answer only."""

    chosen: Encoded
    rejected: Encoded
    reference: tuple[float, float] | None = None
    """The reference model's summed log-probabilities of the chosen and the rejected answer, where they were
    computed ahead of training (DPO's dpo.precompute_reference); else None."""
    margin: float | None = None
    """The record's margin: by how much a reward model's reward of the chosen answer must beat the rejected one's
    (TRL's `margin` column); None where the record has none."""

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated


def encode_pairs(
    tokenizer, pairs: list[dict[str, Any]], *, max_len: int, chat: bool = True
) -> tuple[list[Pair], dict[str, int]]:
    """Tokenize pairs (`lorakit.data.tokenize.encode_example` on each side). Also returns counts: pairs,
    truncated (either side cut to max_len), tokens, learned_tokens, dropped (a side with no answer token left, or
    a tie: both sides the same tokens, which teach nothing)."""
    out: list[Pair] = []
    stats = {"pairs": len(pairs), "truncated": 0, "tokens": 0, "learned_tokens": 0, "dropped": 0}
    for p in pairs:
        pair = Pair(
            *(encode_example(tokenizer, p[s], max_len=max_len, chat=chat) for s in ("chosen", "rejected")),
            margin=p.get("margin"),
        )
        stats["truncated"] += pair.truncated
        sides = (pair.chosen, pair.rejected)
        tie = pair.chosen.input_ids == pair.rejected.input_ids
        if tie or any(all(label == IGNORE for label in e.labels[1:]) for e in sides):
            stats["dropped"] += 1
            continue
        stats["tokens"] += sum(len(e.input_ids) for e in sides)
        stats["learned_tokens"] += sum(label != IGNORE for e in sides for label in e.labels[1:])
        out.append(pair)
    return out, stats
