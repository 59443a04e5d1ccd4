"""An embedding model's data (`train.objective embed`): texts and the texts that belong with them, as
sentence-transformers names them.

    {"anchor": "How do I reset my password?", "positive": "Open Settings, then Account, then Reset password."}
    {"anchor": "the 5th of March, 2021", "positive": "2021-03-05", "negative": "2021-05-03"}

Each `anchor` is trained to lie nearer its `positive` than every other text of the batch (the other rows'
positives, and each row's `negative`, a hard negative, where given). Common column names are read as these where
the record has no `anchor`/`positive`/`negative`: query, question, sentence1, text1 as the anchor; pos, document,
passage, answer, response, sentence2, text2 as the positive; neg as the negative. `data.fields` maps any other
(`{anchor: title, positive: abstract}`). Every record is checked, and an error names the file, the record and
what is wrong; a record with a score or a label (STS's, NLI's pairs) is refused, because every pair here is taken
as one that belongs together.
"""

from __future__ import annotations

import os
from typing import Any

from lorakit.data.files import DataError, parse_records, read_records
from lorakit.data.shapes import check_fields, named_records

KEYS = ("anchor", "positive", "negative")
ALIASES = {
    "anchor": ("query", "question", "sentence1", "text1"),
    "positive": ("pos", "document", "passage", "answer", "response", "sentence2", "text2"),
    "negative": ("neg",),
}
"""Other column names read as lorakit's keys where a record lacks them (the first one present)."""
SCORES = ("score", "label", "labels", "similarity", "similarity_score", "relatedness_score")
"""Columns that make a pair a scored one (STS's similarity, NLI's or pair classification's label): refused, since
the loss would take a pair scored as unrelated for one that belongs together."""


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
        scored = next((k for k in SCORES if k in record), None)
        if scored is not None:
            raise DataError(
                f"{where}: has a {scored!r} ({str(record[scored])[:20]!r}): a scored pair (STS, NLI), which "
                "train.objective embed would learn as a pair that belongs together whatever its score; keep the "
                f"pairs that belong together and drop the {scored!r} column (scored-pair losses are not built yet)"
            )
        if record["anchor"] == record["positive"]:
            raise DataError(f"{where}: the anchor and the positive are the same text, which teaches nothing")
        out.append(
            {"anchor": record["anchor"], "positive": record["positive"], "negative": record.get("negative")}
        )
    return out


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
