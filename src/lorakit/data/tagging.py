"""Token classification data (`train.objective token_classify`: named entities, dates, any spans of a text to find
and type). A record is words with a tag each, as CoNLL files and Hugging Face's NER datasets have them:

    {"tokens": ["Anna", "flew", "to", "New", "York", "."], "tags": ["B-PER", "O", "O", "B-LOC", "I-LOC", "O"]}

(`ner_tags` is read as `tags`; tags are names: BIO, IOB1, BIOES or plain types, "O" outside; tag ids where the
data names them, as a `datasets` folder or a Hub Parquet file of CoNLL-2003 or WikiANN does in its `ClassLabel`
feature), or a text with its entities as character spans, as span annotators (doccano, Label Studio) export them:

    {"text": "Anna flew to New York.", "entities": [{"start": 13, "end": 21, "label": "LOC"}, [0, 4, "PER"]]}

Both become a text and its typed spans (`{"text", "spans": [(start, end, type)]}`; words are joined by one space).
The model tags each of its own tokens (`tag_names`: "O" and, per type, "B-" for an entity's first token and "I-"
for the others), so the spans, not the words, are the truth: a tokenizer that cuts a word in three tags all three,
and the evaluation compares the spans the tags give back (`decode_tags`) with the data's, entity by entity
(`entity_counts`: an entity is found when its start, end and type are all right, as seqeval counts). `data.fields`
maps other column names onto these. Every record is checked, and an error names the file, the record and what is
wrong.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

from lorakit.data.files import DataError, label_names, read_records
from lorakit.data.shapes import check_fields, named_records
from lorakit.data.tokenize import IGNORE, Encoded

OUTSIDE = "O"
Span = tuple[int, int, str]


@dataclass
class Tagged:
    """One tokenized token-classification example: its token row (`labels`: each token's tag id, IGNORE for the
    tokenizer's special tokens and tokens of spaces only), each token's character range in `text` (None for a token
    that carries no tag: a special token, or one of spaces only), and the text's entities as spans."""

    row: Encoded
    text: str
    offsets: list[tuple[int, int] | None]
    spans: list[Span]


def read_tagged(path: str | os.PathLike, fields: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """All token-classification records of a data file (JSONL, JSON, CSV cells of JSON lists, Parquet or Arrow, or
    a `datasets` folder) as {"text", "spans"}, validated; DataError naming the record. Tag ids are read as the
    names the data gives its tag column (`label_names`)."""
    check_fields(fields, str(path))
    names = label_names(path)
    column = (fields or {}).get("tags") or next((c for c in ("tags", "ner_tags") if c in names), None)
    return tagged_of(read_records(path), str(path), fields or {}, names.get(column))


def tagged_of(
    records: list[tuple[str, Any]], source: str, fields: dict[str, str], tags: list[str] | None = None
) -> list[dict[str, Any]]:
    """`read_tagged` of records as read; `tags`: the names of tag ids, where the data gives them."""
    out = []
    for where, record in named_records(records, source, fields):
        if "tags" not in record and "ner_tags" in record:
            record = {**record, "tags": record["ner_tags"]}
        if "tokens" in record or "tags" in record:
            out.append(_from_words(record, where, tags))
        elif "text" in record and "entities" in record:
            out.append(_from_spans(record, where))
        else:
            raise DataError(
                f"{where}: a token-classification example needs 'tokens' and 'tags' (words and their tags) or "
                f"'text' and 'entities' (character spans); has {sorted(record)}"
            )
    return out


def _from_words(record: dict[str, Any], where: str, names: list[str] | None = None) -> dict[str, Any]:
    words, tags = record.get("tokens"), record.get("tags")
    if names and isinstance(tags, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in tags):
        wrong = next((t for t in tags if not 0 <= t < len(names)), None)
        if wrong is not None:
            raise DataError(f"{where}: the tag id {wrong} is not one of the data's {len(names)} tag names")
        tags = [names[t] for t in tags]
    if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
        raise DataError(f"{where}: 'tokens' must be a non-empty list of non-empty words, got {words!r:.80}")
    if not isinstance(tags, list) or len(tags) != len(words):
        n = len(tags) if isinstance(tags, list) else type(tags).__name__
        raise DataError(f"{where}: 'tags' must be a list of one tag per word ({len(words)} words), got {n}")
    bad = next((t for t in tags if not isinstance(t, str) or not t.strip()), None)
    if bad is not None or None in tags:
        hint = " (tag ids need their names: map them first)" if isinstance(bad, int) else ""
        raise DataError(f"{where}: every tag must be a tag name such as B-PER, I-PER or O, got {bad!r}{hint}")
    pieces, at = [], 0
    for word, tag in zip(words, tags, strict=True):
        pieces.append((at, at + len(word), *_split_tag(tag, where)))
        at += len(word) + 1
    return {"text": " ".join(words), "spans": _read_spans(pieces)}


def _split_tag(tag: str, where: str | None = None) -> tuple[str | None, str | None]:
    """(prefix, type) of a tag: ("B", "PER") of "B-PER"; (None, "PER") of a plain "PER" (a PEFT adapter's LABEL_i
    too); (None, None) of "O". With `where` (a data record), a prefix without a type is a DataError naming it."""
    if tag == OUTSIDE:
        return None, None
    if len(tag) > 2 and tag[0] in "BIES" and tag[1] in "-_":
        return tag[0], tag[2:]
    if where is not None and tag[:2] in ("B-", "I-", "E-", "S-"):
        raise DataError(f"{where}: the tag {tag!r} has no type after its prefix")
    return None, tag


def _read_spans(pieces, text: str | None = None) -> list[Span]:
    """The typed spans that pieces of a text say, each (start, end, prefix, type) in order (`_split_tag`'s prefix
    and type; type None: outside): an entity begins at "B-" or "S-", or at a piece whose type is not the open
    entity's (an "I-" after "O" too, seqeval's reading; plain types join while they run), runs over the pieces of
    its type, and ends after "E-" or "S-". With the `text`, a "B-" inside a word (its piece follows the entity's
    last one with no character between, a letter or digit on each side) continues its entity."""
    spans: list[Span] = []
    open_: list[Any] | None = None  # [start, end, type] of the entity being read
    for start, end, prefix, kind in pieces:
        inside_word = (
            text is not None
            and open_ is not None
            and open_[1] == start > 0
            and text[start - 1].isalnum()
            and text[start].isalnum()
        )
        if (
            kind is not None
            and open_ is not None
            and open_[2] == kind
            and (prefix not in ("B", "S") or (prefix == "B" and inside_word))
        ):
            open_[1] = max(open_[1], end)
        else:
            if open_ is not None:
                spans.append(tuple(open_))
            open_ = None if kind is None else [start, end, kind]
        if open_ is not None and prefix in ("E", "S"):
            spans.append(tuple(open_))
            open_ = None
    if open_ is not None:
        spans.append(tuple(open_))
    return spans


def _from_spans(record: dict[str, Any], where: str) -> dict[str, Any]:
    text, entities = record["text"], record["entities"]
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: 'text' must be a non-empty string")
    if not isinstance(entities, list):
        raise DataError(f"{where}: 'entities' must be a list of spans, got {type(entities).__name__}")
    spans: list[Span] = []
    for e in entities:
        if isinstance(e, dict):
            start, end, kind = e.get("start"), e.get("end"), e.get("label", e.get("type"))
        elif isinstance(e, (list, tuple)) and len(e) == 3:
            start, end, kind = e
        else:
            raise DataError(
                f"{where}: an entity is {{start, end, label}} or [start, end, label], got {e!r:.80}"
            )
        if not (isinstance(start, int) and isinstance(end, int)) or not 0 <= start < end <= len(text):
            raise DataError(
                f"{where}: the entity {e!r:.80} needs 0 <= start < end <= {len(text)} (the text's length)"
            )
        if not isinstance(kind, str) or not kind.strip() or kind == OUTSIDE:
            raise DataError(f"{where}: the entity {e!r:.80} needs a type (a non-empty label other than O)")
        if not text[start:end].strip():
            raise DataError(f"{where}: the entity {e!r:.80} covers only spaces")
        spans.append((start, end, kind))
    spans.sort()
    for a, b in zip(spans, spans[1:], strict=False):
        if b[0] < a[1]:
            raise DataError(f"{where}: the entities {list(a)} and {list(b)} overlap; a token has one tag")
    return {"text": text, "spans": spans}


def tag_names(items: list[dict[str, Any]], source: str) -> list[str]:
    """The model's tags for `items`' entity types: "O", then "B-" and "I-" of each type in sorted order. DataError
    where no example has an entity: there is nothing to learn."""
    kinds = sorted({s[2] for it in items for s in it["spans"]})
    if not kinds:
        raise DataError(f"{source}: no example has an entity; token classification needs some to learn")
    return [OUTSIDE] + [f"{p}-{k}" for k in kinds for p in ("B", "I")]


def entity_types(names: list[str]) -> list[str]:
    """The entity types of a tag list (`tag_names`'s)."""
    return [n[2:] for n in names if n.startswith("B-")]


def encode_tagged(
    tokenizer, items: list[dict[str, Any]], names: list[str], *, max_len: int, source: str = "data"
) -> tuple[list[Tagged], dict[str, Any]]:
    """Tokenize each text with its tokens' character offsets, cut to `max_len` tokens, and tag each token: "B-"
    on the first token of an entity that overlaps it, "I-" on the others, "O" outside, IGNORE on special tokens
    and tokens of spaces only (a byte-level tokenizer's space before digits: its tag would say nothing).
    Returns the rows and counts: examples, truncated, tokens, entities per type. An entity type `names` lacks is a
    DataError naming it; a tokenizer without offsets (not a fast tokenizer) is a DataError too."""
    index = {n: i for i, n in enumerate(names)}
    known = set(entity_types(names))
    rows: list[Tagged] = []
    stats: dict[str, Any] = {"examples": len(items), "truncated": 0, "tokens": 0, "entities": Counter()}
    for n, it in enumerate(items):
        text, spans = it["text"], it["spans"]
        unknown = next((s[2] for s in spans if s[2] not in known), None)
        if unknown is not None:
            raise DataError(
                f"{source}, example {n + 1}: the entity type {unknown!r} is not one of the train data's "
                f"({', '.join(sorted(known))})"
            )
        ids, offsets = token_offsets(tokenizer, text, max_len)
        labels = [
            IGNORE if o is None else index[tag]
            for o, tag in zip(offsets, _token_tags(offsets, spans), strict=True)
        ]
        covered = max((o[1] for o in offsets if o is not None), default=0)
        truncated = covered < len(text.rstrip())
        spans = [s for s in spans if s[0] < covered]  # an entity cut away entirely is no longer in the row
        stats["truncated"] += truncated
        stats["tokens"] += len(ids)
        stats["entities"].update(s[2] for s in spans)
        rows.append(Tagged(Encoded(list(ids), labels, truncated), text, offsets, list(spans)))
    stats["entities"] = dict(sorted(stats["entities"].items()))
    return rows, stats


def token_offsets(
    tokenizer, text: str, max_len: int | None = None
) -> tuple[list[int], list[tuple[int, int] | None]]:
    """`text`'s token ids as a token classifier reads them (the tokenizer's special tokens; cut to `max_len`) and
    each token's character range in it, without the spaces a byte-level tokenizer counts in a token (None for a
    token that carries no tag: a special token, or a token of spaces only, which SmolLM2's tokenizer makes of
    the space before a number: tagged, it would have to say whether the space belongs to an entity). DataError
    for a tokenizer that gives no offsets (not a fast tokenizer)."""
    cut = {"truncation": True, "max_length": max_len} if max_len else {}
    try:
        enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True, **cut)
    except NotImplementedError as exc:
        raise DataError(
            f"token classification needs each token's character offsets, which the tokenizer "
            f"{type(tokenizer).__name__} does not give (use a fast tokenizer)"
        ) from exc
    special = enc["special_tokens_mask"]
    offsets = [
        None if s else _trimmed(text, a, b) for (a, b), s in zip(enc["offset_mapping"], special, strict=True)
    ]
    return list(enc["input_ids"]), offsets


def _trimmed(text: str, a: int, b: int) -> tuple[int, int] | None:
    """A token's character range without the spaces a byte-level tokenizer counts in it (" York" -> "York"); None
    for a token of spaces only (or of no characters)."""
    piece = text[a:b]
    if not piece.strip():
        return None
    return a + len(piece) - len(piece.lstrip()), b - (len(piece) - len(piece.rstrip()))


def _token_tags(offsets: list[tuple[int, int] | None], spans: list[Span]) -> list[str]:
    tags = []
    begun: set[int] = set()
    for o in offsets:
        tag = OUTSIDE
        if o is not None:
            for k, (s, e, kind) in enumerate(spans):
                if o[0] < e and s < o[1]:
                    tag = ("I-" if k in begun else "B-") + kind
                    begun.add(k)
                    break
        tags.append(tag)
    return tags


def decode_tags(
    tags: list[int], offsets: list[tuple[int, int] | None], names: list[str], text: str | None = None
) -> list[Span]:
    """The typed character spans that tokens' tag ids say: an entity starts at a "B-" tag, or at an "I-" tag that
    does not continue an entity of its type (seqeval's default reading), and runs to its last "I-" token. Tags
    without a prefix (a PEFT adapter's LABEL_i, plain types) are types whose runs of tokens are entities.

    With the `text`, a "B-" tag inside a word (its token follows the entity's last one with no character between,
    a letter or digit on each side) continues the entity of its type instead of beginning another: a word cut in
    pieces ("Aisha" as "ai", "##sha") is one entity or none, as transformers' pipeline reads a word by its first
    piece."""
    pieces = ((*o, *_split_tag(names[t])) for t, o in zip(tags, offsets, strict=True) if o is not None)
    return _read_spans(pieces, text)


def entity_counts(predicted: list[Span], truth: list[Span]) -> dict[str, Counter]:
    """Per entity type, the true positives (`tp`: a predicted span whose start, end and type all match one in
    `truth`), false positives (`fp`) and false negatives (`fn`)."""
    said, real = set(predicted), set(truth)
    out = {"tp": Counter(), "fp": Counter(), "fn": Counter()}
    for s in said & real:
        out["tp"][s[2]] += 1
    for s in said - real:
        out["fp"][s[2]] += 1
    for s in real - said:
        out["fn"][s[2]] += 1
    return out


def f1_of(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """(precision, recall, F1); 1 where nothing was there to find and nothing was found."""
    if tp + fp + fn == 0:
        return 1.0, 1.0, 1.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return precision, recall, 2 * tp / (2 * tp + fp + fn)
