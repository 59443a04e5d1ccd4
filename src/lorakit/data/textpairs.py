"""An embedding model's data (`train.objective embed`): texts and the texts that belong with them, as
sentence-transformers names them.

    {"anchor": "How do I reset my password?", "positive": "Open Settings, then Account, then Reset password."}
    {"anchor": "the 5th of March, 2021", "positive": "2021-03-05", "negative": "2021-05-03"}

Each `anchor` is trained to lie nearer its `positive` than every other text of the batch (the other rows'
positives, and each row's `negative`, a hard negative, where given). Common column names are read as these where
the record has no `anchor`/`positive`/`negative`: query, question, sentence1, text1 as the anchor; pos, document,
passage, answer, response, sentence2, text2 as the positive; neg as the negative. `data.fields` maps any other
(`{anchor: title, positive: abstract}`). Every record is checked, and an error names the file, the record and
what is wrong.

Scored pairs (STS): every record with a `score` (or `similarity`, `similarity_score`, `relatedness_score`), a
number, higher for texts more alike, trains with CoSENT instead, which orders the pairs' cosine similarities as
their scores:

    {"sentence1": "A man plays a guitar.", "sentence2": "A man plays an instrument.", "score": 4.2}

A file is all scored or all not. A `label` column is refused unless data.fields maps it ({score: label}).
"""

from __future__ import annotations

import math
import os
from typing import Any

from lorakit.data.files import DataError, parse_records, read_records
from lorakit.data.shapes import check_fields, named_records

KEYS = ("anchor", "positive", "negative")
SCORE_ALIASES = ("similarity", "similarity_score", "relatedness_score")
"""Other column names read as a scored pair's `score` (STS's similarity, SICK's relatedness)."""
ALIASES = {
    "anchor": ("query", "question", "sentence1", "text1"),
    "positive": ("pos", "document", "passage", "answer", "response", "sentence2", "text2"),
    "negative": ("neg",),
    "score": SCORE_ALIASES,
}
"""Other column names read as lorakit's keys where a record lacks them (the first one present)."""
LABELS = ("label", "labels")
"""Columns refused in a text pair: a label (NLI's entailment, a pair classifier's class) is no similarity unless
data.fields says so ({score: label})."""


def read_text_pairs(path: str | os.PathLike, fields: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """All records of a data file (JSONL, JSON, CSV, TSV, Parquet or Arrow, or a `datasets` folder) as
    {"anchor", "positive", "negative" (None if absent)}, validated; DataError naming the record."""
    check_fields(fields, str(path))
    return text_pairs_of(read_records(path), str(path), fields or {})


def parse_text_pairs(data: bytes, source: str, fields: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """`read_text_pairs` of a file's bytes, read as `source`'s suffix says."""
    check_fields(fields, source)
    return text_pairs_of(parse_records(data, source), source, fields or {})


def text_pairs_of(
    records: list[tuple[str, Any]], source: str, fields: dict[str, str]
) -> list[dict[str, Any]]:
    out = []
    scored: bool | None = None  # whether the file's records are scored pairs (its first record says)
    for where, named in named_records(records, source, fields):
        record = _aliased(named)
        for key in KEYS:
            value = record.get(key)
            if key == "negative" and value is None:
                continue
            if not isinstance(value, str) or not value.strip():
                got = "nothing" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"
                raise DataError(
                    f"{where}: an embedding example needs a non-empty {key!r} string (got {got}; has "
                    f"{sorted(record)}; data.fields maps another column to it, e.g. '{{{key}: {_example(key)}}}')"
                )
        label = next((k for k in LABELS if k in record), None)
        if label is not None:
            raise DataError(
                f"{where}: has a {label!r} ({str(record[label])[:20]!r}), which is no similarity (NLI's classes, a "
                f"pair classifier's): map it to a score with data.fields '{{score: {label}}}' where higher means "
                "more alike, or drop it"
            )
        score = _score(record, where)
        if scored is None:
            scored = score is not None
        elif (score is not None) != scored:
            raise DataError(
                f"{where}: {'has' if score is not None else 'has no'} 'score', unlike the records before it: a "
                "file is either pairs that belong together or pairs scored for similarity, not both"
            )
        if score is None and record["anchor"] == record["positive"]:
            raise DataError(f"{where}: the anchor and the positive are the same text, which teaches nothing")
        if score is not None and record.get("negative") is not None:
            raise DataError(
                f"{where}: a scored pair has no hard negative (its score says how alike the two texts are); drop "
                "the 'negative'"
            )
        item = {
            "anchor": record["anchor"],
            "positive": record["positive"],
            "negative": record.get("negative"),
        }
        if score is not None:
            item["score"] = score
        out.append(item)
    return out


def _score(record: dict[str, Any], where: str) -> float | None:
    """A record's similarity score (a finite number), or None where it has none."""
    if "score" not in record:
        return None
    value = record["score"]
    number = _number(value)
    if number is None or not math.isfinite(number):
        raise DataError(
            f"{where}: 'score' must be a finite number (higher: more alike), got {str(value)[:40]!r}"
        )
    return number


def _number(value: Any) -> float | None:
    """A number, or a text that reads as one (CSV's cells are text); None for anything else (booleans too)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None if isinstance(value, bool) or not isinstance(value, (int, float)) else float(value)


def _aliased(record: dict[str, Any]) -> dict[str, Any]:
    out = dict(record)
    for key, names in ALIASES.items():
        if key not in out:
            found = next((n for n in names if n in record), None)
            if found is not None:
                out[key] = out.pop(found)
    return out


def _example(key: str) -> str:
    return {"anchor": "question", "positive": "answer", "negative": "wrong_answer"}[key]
