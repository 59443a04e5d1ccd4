"""An embedding model's data (`lorakit.data.textpairs`, as train.objective embed reads it): text pairs read by
their common column names and checked record by record, and pairs scored for similarity (STS); every bad record is
one line naming it."""

from __future__ import annotations

import pytest

from lorakit.data.files import DataError
from lorakit.data.textpairs import parse_text_pairs, read_text_pairs


def test_text_pairs_are_read_with_common_column_names_and_checked():
    rows = parse_text_pairs(
        b'{"query": "q1", "document": "d1"}\n{"anchor": "a", "positive": "p", "negative": "n"}\n'
        b'{"question": "why?", "answer": "because", "neg": "no"}\n',
        "pairs.jsonl",
    )
    assert rows == [
        {"anchor": "q1", "positive": "d1", "negative": None},
        {"anchor": "a", "positive": "p", "negative": "n"},
        {"anchor": "why?", "positive": "because", "negative": "no"},
    ]
    assert (
        parse_text_pairs(
            b'{"title": "t", "abstract": "b"}\n', "x.jsonl", {"anchor": "title", "positive": "abstract"}
        )[0]["positive"]
        == "b"
    )
    assert parse_text_pairs(b"sentence1,sentence2\nhi,hello\n", "x.csv")[0] == {
        "anchor": "hi",
        "positive": "hello",
        "negative": None,
    }


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", r"pairs.jsonl: no examples"),
        (b'{"anchor": "a"}\n', r"pairs.jsonl:1: an embedding example needs a non-empty 'positive' string"),
        (b'{"anchor": " ", "positive": "p"}\n', r"pairs.jsonl:1: .* non-empty 'anchor' string"),
        (b'{"anchor": "a", "positive": 3}\n', r"pairs.jsonl:1: .*'positive' string \(got int '3'"),
        (b'{"anchor": "a", "positive": "p", "negative": ""}\n', r"pairs.jsonl:1: .*'negative' string"),
        (
            b'{"anchor": "a", "positive": "a"}\n',
            r"pairs.jsonl:1: the anchor and the positive are the same text",
        ),
        (b'["a", "b"]\n', r"pairs.jsonl:1: expected a JSON object, got list"),
        (b'{"question": "q", "answer": "a", "label": 0}\n', r"pairs.jsonl:1: has a 'label' \('0'\)"),
        (
            b'{"anchor": "a", "positive": "p"}\n{"text": "t"}\n',
            r"pairs.jsonl:2: .*'anchor' string .*has \['text'\]",
        ),
    ],
)
def test_bad_text_pairs_are_one_line_naming_the_record(data, message):
    with pytest.raises(DataError, match=message) as e:
        parse_text_pairs(data, "pairs.jsonl")
    assert "\n" not in str(e.value)


def test_a_missing_file_and_a_bad_fields_mapping(tmp_path):
    with pytest.raises(DataError, match="nowhere.jsonl: data file not found"):
        read_text_pairs(tmp_path / "nowhere.jsonl")
    with pytest.raises(DataError, match="data.fields maps 'query'"):
        read_text_pairs(tmp_path / "nowhere.jsonl", {"query": "q"})


def test_scored_pairs_are_read_with_their_aliases():
    got = parse_text_pairs(
        b'{"sentence1": "a", "sentence2": "b", "similarity": 3}\n{"anchor": "c", "positive": "c", "score": "5"}\n',
        "sts.jsonl",
    )
    assert got == [  # a scored pair may pair a text with itself (the top of the scale)
        {"anchor": "a", "positive": "b", "negative": None, "score": 3.0},
        {"anchor": "c", "positive": "c", "negative": None, "score": 5.0},
    ]
    got = parse_text_pairs(b"text1,text2,label\na,b,0.5\n", "sts.csv", {"score": "label"})
    assert got == [{"anchor": "a", "positive": "b", "negative": None, "score": 0.5}]


@pytest.mark.parametrize(
    "data, message",
    [
        (
            b'{"anchor": "a", "positive": "b", "score": "high"}\n',
            r"sts.jsonl:1: 'score' must be a finite number",
        ),
        (
            b'{"anchor": "a", "positive": "b", "score": true}\n',
            r"sts.jsonl:1: 'score' must be a finite number",
        ),
        (
            b'{"anchor": "a", "positive": "b", "score": NaN}\n',
            r"sts.jsonl:1: 'score' must be a finite number",
        ),
        (
            b'{"anchor": "a", "positive": "b", "score": 1}\n{"anchor": "a", "positive": "c"}\n',
            r"sts.jsonl:2: has no 'score', unlike the records before it",
        ),
        (
            b'{"anchor": "a", "positive": "b"}\n{"anchor": "a", "positive": "c", "score": 1}\n',
            r"sts.jsonl:2: has 'score', unlike the records before it",
        ),
        (
            b'{"anchor": "a", "positive": "b", "negative": "c", "score": 1}\n',
            r"sts.jsonl:1: a scored pair has no hard negative",
        ),
        (
            b'{"sentence1": "a", "sentence2": "b", "label": 2}\n',
            r"sts.jsonl:1: has a 'label' \('2'\), which is no similarity .*data.fields '\{score: label\}'",
        ),
    ],
)
def test_bad_scored_pairs_are_one_line_naming_the_record(data, message):
    with pytest.raises(DataError, match=message) as e:
        parse_text_pairs(data, "sts.jsonl")
    assert "\n" not in str(e.value)
