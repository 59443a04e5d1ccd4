"""Text classification data (`train.objective classify`): records of a text, optionally a second text, and a label;
and regression data (`train.objective regression`), whose label is a number to predict (GLUE's STS-B).

    {"text": "The food was great.", "label": "positive"}
    {"text": "A man plays a guitar.", "text_pair": "Someone makes music.", "label": 0}

`data.fields` maps other column names onto these (GLUE's `{text: sentence}`, `{text: sentence1, text_pair:
sentence2}`). A label is a name (a string) or a class id (an integer >= 0, as in Hugging Face datasets; digits in
a CSV cell too; true and false are 1 and 0). The classes: with names, the train data's names in sorted order; with ids, 0 to the largest id.
A multi-label example's label is a list of classes (names or ids; empty where none applies): several classes per
text, each a yes or no (`is_multi_label`). A regression label is a finite number (an integer or a float, or its
digits in a CSV cell).
Every record is checked, and an error names the file, the record and what is wrong.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from lorakit.data.files import DataError, label_names, parse_records, read_records
from lorakit.data.shapes import check_fields, named_records
from lorakit.data.tokenize import IGNORE, Encoded

KEYS = ("text", "text_pair", "label")


@dataclass
class Labelled:
    """One tokenized classification example: its token row (no token is learned: `labels` all IGNORE) and its
    class id."""

    row: Encoded
    label: int | float
    """The class id; a regression's target."""


def read_labelled(
    path: str | os.PathLike, fields: dict[str, str] | None = None, *, scores: bool = False
) -> list[dict[str, Any]]:
    """All classification records of a data file (JSONL, JSON, CSV, TSV, Parquet or Arrow, or a `datasets`
    folder) as {"text", "text_pair" (None if absent), "label"}, validated; DataError naming the record. `scores`:
    regression records, whose label is a number. Class ids are read as the names the data gives its label column
    (a `datasets` folder's or a Hub Parquet file's `ClassLabel` feature, as GLUE's have; `label_names`)."""
    check_fields(fields, str(path))
    items = labelled_of(read_records(path), str(path), fields or {}, scores=scores)
    names = None if scores else label_names(path).get((fields or {}).get("label", "label"))
    return items if not names else [_named(it, names, str(path), i) for i, it in enumerate(items, 1)]


def _named(item: dict[str, Any], names: list[str], source: str, row: int) -> dict[str, Any]:
    """`item` with its class ids (or list of them) as the data's class names."""

    def name(c: Any) -> Any:
        if not isinstance(c, int):
            return c
        if c >= len(names):
            raise DataError(
                f"{source}: row {row}: the class id {c} is not one of the data's {len(names)} class names"
            )
        return names[c]

    label = item["label"]
    named = sorted({name(c) for c in label}, key=str) if isinstance(label, list) else name(label)
    return {**item, "label": named}


def parse_labelled(data: bytes, source: str, fields: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """`read_labelled` of a file's bytes, read as `source`'s suffix says."""
    check_fields(fields, source)
    return labelled_of(parse_records(data, source), source, fields or {})


def labelled_of(
    records: list[tuple[str, Any]], source: str, fields: dict[str, str], *, scores: bool = False
) -> list[dict[str, Any]]:
    out = []
    for where, record in named_records(records, source, fields):
        text, pair = record.get("text"), record.get("text_pair")
        if not isinstance(text, str) or not text.strip():
            raise DataError(
                f"{where}: a classification example needs a non-empty 'text' string (data.fields maps another "
                f"column to it, e.g. '{{text: sentence}}'); has {sorted(record)}"
            )
        if pair is not None and not isinstance(pair, str):
            raise DataError(f"{where}: 'text_pair' must be a string, got {type(pair).__name__}")
        if "label" not in record:
            what = "a number to predict" if scores else "a class name, or a class id >= 0"
            raise DataError(f"{where}: no 'label' ({what}); has {sorted(record)}")
        raw = record["label"]
        if scores:
            label = _score(raw, where)
        elif isinstance(raw, (list, tuple)):  # several classes per text (multi-label)
            label = sorted({_label(v, where) for v in raw}, key=str)
            if len({type(v) for v in label}) > 1:
                raise DataError(f"{where}: label {list(raw)!r} mixes class names and class ids")
        else:
            label = _label(raw, where)
        out.append({"text": text, "text_pair": pair, "label": label})
    return out


def _score(value: Any, where: str) -> float:
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        raise DataError(f"{where}: label {value!r} is not a finite number, which a regression predicts")
    return number


def _label(value: Any, where: str) -> str | int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a Parquet column of whole numbers
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)  # a CSV cell of digits: a class id
    if isinstance(value, int):
        if value < 0:
            raise DataError(f"{where}: label {value} is negative; a class id is >= 0")
        return value
    if isinstance(value, str) and value.strip():
        return value
    raise DataError(
        f"{where}: label {value!r} is neither a class name (a string) nor a class id (an integer >= 0)"
    )


def is_multi_label(items: list[dict[str, Any]], source: str) -> bool:
    """Whether the examples' labels are lists of classes (several per text); DataError where some are and some
    are not."""
    lists = {isinstance(it["label"], list) for it in items}
    if len(lists) > 1:
        first = next(
            i
            for i, it in enumerate(items)
            if isinstance(it["label"], list) != isinstance(items[0]["label"], list)
        )
        raise DataError(
            f"{source}: example {first + 1}'s label {items[first]['label']!r} and example 1's "
            f"{items[0]['label']!r}: the labels mix lists of classes (several per text) and single classes"
        )
    return lists == {True}


def class_names(items: list[dict[str, Any]], source: str) -> list[str]:
    """The classes of the train examples, by id: their sorted label names, or for integer labels "0" to the largest
    id (of multi-label examples, of every list). DataError where the labels mix names and ids, or lists and single
    classes, or where there is one class only."""
    multi = is_multi_label(items, source)
    labels = {v for it in items for v in it["label"]} if multi else {it["label"] for it in items}
    if not labels:
        raise DataError(f"{source}: every example's list of classes is empty; a classifier needs classes")
    kinds = {type(v) for v in labels}
    if len(kinds) > 1:
        raise DataError(
            f"{source}: the labels mix class names and class ids ({sorted(map(str, labels))[:4]}...)"
        )
    names = [str(i) for i in range(max(labels) + 1)] if kinds == {int} else sorted(labels)
    if len(names) < 2:
        raise DataError(
            f"{source}: every example has the label {names[0]!r}; a classifier needs two classes or more"
        )
    return names


def class_ids(
    items: list[dict[str, Any]], names: list[str], source: str
) -> list[int] | list[tuple[int, ...]]:
    """Each item's class id among `names` (a multi-label item's: the tuple of its classes' ids); DataError naming
    the first label that is not one of them."""
    index = {n: i for i, n in enumerate(names)}
    if items and isinstance(items[0]["label"], list):
        ids = []
        for i, it in enumerate(items):
            unknown = [v for v in it["label"] if str(v) not in index]
            if unknown:
                raise DataError(
                    f"{source}: example {i + 1} has the label {unknown[0]!r}, which the train data does not have "
                    f"(its classes: {', '.join(names)})"
                )
            ids.append(tuple(index[str(v)] for v in it["label"]))
        return ids
    out = []
    for i, it in enumerate(items):
        key = str(it["label"])
        if key not in index:
            raise DataError(
                f"{source}: example {i + 1} has the label {it['label']!r}, which the train data does not have "
                f"(its classes: {', '.join(names)})"
            )
        out.append(index[key])
    return out


def encode_labelled(
    tokenizer, items: list[dict[str, Any]], names: list[str], *, max_len: int, source: str = "data"
) -> tuple[list[Labelled], dict[str, int]]:
    """Tokenize classification items as the tokenizer's own classification input (its special tokens, a pair
    joined its way), cut to `max_len` tokens; returns the rows and counts: examples, truncated, tokens."""
    return encode_targets(tokenizer, items, class_ids(items, names, source), max_len=max_len)


def encode_targets(
    tokenizer, items: list[dict[str, Any]], targets: list[int] | list[float], *, max_len: int
) -> tuple[list[Labelled], dict[str, int]]:
    """`encode_labelled` with each item's target given: its class id, or a regression's number."""
    out: list[Labelled] = []
    stats = {"examples": len(items), "truncated": 0, "tokens": 0}
    for it, label in zip(items, targets, strict=True):
        args = (it["text"],) if it["text_pair"] is None else (it["text"], it["text_pair"])
        full = tokenizer(*args)["input_ids"]
        cut = (
            full
            if len(full) <= max_len
            else tokenizer(*args, truncation=True, max_length=max_len)["input_ids"]
        )
        truncated = len(cut) < len(full)
        stats["truncated"] += truncated
        stats["tokens"] += len(cut)
        out.append(Labelled(Encoded(list(cut), [IGNORE] * len(cut), truncated), label))
    return out, stats
