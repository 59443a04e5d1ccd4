"""A classifier's class weights (`classify.class_weights`): the loss, the balanced rule, the mapping and its
errors, and what a run does with them (accumulated micro-batches equal one large batch, as without weights).

The tiny model is a random 2-layer Llama with SmolLM2's real tokenizer (trl_dpo_oracle's), loaded as a sequence
classifier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit.errors import ConfigError
from lorakit.train.config import load_config
from lorakit.train.datasets import Classes, class_weights
from lorakit.train.losses import class_loss
from lorakit.train.run import run_training

from trl_dpo_oracle import build_tiny_model

WORDS = {"a": "good fine great", "b": "bad awful poor", "c": "odd strange weird"}


def _items(counts: dict[str, int]) -> list[dict]:
    out = []
    for label, n in counts.items():
        words = WORDS[label].split()
        out += [
            {"text": f"it was {words[i % 3]} number {i}", "text_pair": None, "label": label} for i in range(n)
        ]
    return out


def test_the_loss_is_each_row_s_weight_times_its_cross_entropy_averaged_over_the_rows():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, generator=g, dtype=torch.float64)
    target = torch.tensor([0, 0, 0, 1, 1, 2])
    weights = [0.5, 1.5, 3.0]
    by_hand = sum(
        weights[int(t)] * (torch.logsumexp(row, 0) - row[t]) for row, t in zip(logits, target, strict=True)
    ) / len(target)
    torch.testing.assert_close(class_loss(logits, target, weights), by_hand, atol=1e-12, rtol=0)
    torch.testing.assert_close(class_loss(logits, target), F.cross_entropy(logits, target), atol=0, rtol=0)
    # two micro-batches of 3 average to the batch of 6 (torch's weighted mean, divided by the weights' sum, does not)
    halves = (class_loss(logits[:3], target[:3], weights) + class_loss(logits[3:], target[3:], weights)) / 2
    torch.testing.assert_close(halves, by_hand, atol=1e-12, rtol=0)
    w = torch.tensor(weights, dtype=torch.float64)
    torch_halves = (
        F.cross_entropy(logits[:3], target[:3], weight=w) + F.cross_entropy(logits[3:], target[3:], weight=w)
    ) / 2
    assert abs(float(torch_halves - F.cross_entropy(logits, target, weight=w))) > 1e-3


def _classes(counts: dict[str, int]) -> Classes:
    return Classes(_items(counts), [], "test data", sorted(counts))


def test_balanced_weights_are_n_over_classes_times_count():
    cfg = load_config(None, ["--objective", "classify", "--classify.class_weights", "balanced"])
    # 9 examples, 3 classes: a 6 -> 9 / (3 * 6), b 2 -> 9 / (3 * 2), c 1 -> 9 / (3 * 1)
    assert class_weights(cfg, _classes({"a": 6, "b": 2, "c": 1})) == pytest.approx([0.5, 1.5, 3.0])
    none = load_config(None, ["--objective", "classify"])
    assert class_weights(none, _classes({"a": 6, "b": 2, "c": 1})) is None


def test_a_mapping_names_classes_and_the_others_weigh_one():
    cfg = load_config(None, ["--objective", "classify", "--classify.class_weights", "{c: 4, a: 0.25}"])
    assert class_weights(cfg, _classes({"a": 6, "b": 2, "c": 1})) == [0.25, 1.0, 4.0]


@pytest.mark.parametrize(
    "overrides, words",
    [
        (
            ["--classify.class_weights", "balanced"],
            "classify.class_weights is set but train.objective is 'sft'",
        ),
        (["--objective", "classify", "--classify.class_weights", "equal"], "none, balanced or a mapping"),
        (["--objective", "classify", "--classify.class_weights", "{a: 0}"], "class 'a' must be > 0"),
        (["--objective", "classify", "--classify.class_weights", "{a: -1}"], "class 'a' must be > 0"),
        (
            ["--objective", "classify", "--classify.class_weights", "{a: .inf}"],
            "a mapping of string -> number",
        ),
    ],
)
def test_bad_settings_are_refused(overrides, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, overrides)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, default_model_dir):
    return build_tiny_model(default_model_dir, tmp_path_factory.mktemp("class_weights") / "model")


def _data(tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "imbalanced.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _items({"a": 24, "b": 6, "c": 2})))
    return path


def _run(model_dir: Path, tmp_path: Path, *overrides: str) -> dict:
    args = ["--model.path", str(model_dir), "--objective", "classify", "--model.dtype", "float32"]
    args += ["--data.train_file", str(_data(tmp_path)), "--data.eval_split", "0.125", "--train.steps", "4"]
    args += ["--train.lr", "5e-3", "--train.out_dir", str(tmp_path / "run"), "--train.save_every", "0"]
    return run_training(load_config(None, [*args, *overrides]))


def test_an_unknown_class_is_refused_before_the_model_loads(model_dir, tmp_path):
    with pytest.raises(ConfigError, match="names 'z', which is no class of .*classes: a, b, c"):
        _run(model_dir, tmp_path, "--classify.class_weights", "{z: 2}")
    assert not (tmp_path / "run" / "adapter").exists()


def test_weighted_runs_accumulate_as_one_batch_and_differ_from_unweighted_ones(model_dir, tmp_path):
    """The weights reach the loss (the adapter differs from an unweighted run's), and 2 micro-batches of 4 train
    as a batch of 8 (1e-5: the same sums in another order)."""
    weighted = ("--classify.class_weights", "balanced")
    one = _run(model_dir, tmp_path / "one", *weighted, "--train.batch_size", "8")
    two = _run(model_dir, tmp_path / "two", *weighted, "--train.batch_size", "4", "--train.grad_accum", "2")
    plain = _run(model_dir, tmp_path / "plain", "--train.batch_size", "8")
    a, b, c = (lorakit.read_adapter(s["adapter"])[1] for s in (one, two, plain))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    assert any(not torch.allclose(a[k], c[k], atol=1e-4) for k in a)
    recorded = (Path(one["adapter"]).parent / "config.yaml").read_text()
    assert "class_weights: balanced" in recorded


def test_balanced_accuracy_is_the_mean_of_the_classes_accuracies(model_dir):
    """On a random classifier's predictions: the eval's accuracy and balanced accuracy equal those counted by hand
    from the model's own logits (3 classes of 12, 3 and 1 examples)."""
    from lorakit.data.labels import encode_labelled
    from lorakit.models import load_model
    from lorakit.train.evaluate import classify_eval
    from lorakit.train.objectives import make_objective

    torch.manual_seed(3)
    model, tok = load_model(str(model_dir), num_labels=3, dtype=torch.float32)
    with torch.no_grad():
        model.score.weight.normal_(0, 2.0)
    items = _items({"a": 12, "b": 3, "c": 1})
    rows, _ = encode_labelled(tok, items, ["a", "b", "c"], max_len=64)
    measured = classify_eval(
        model,
        rows,
        tok.pad_token_id,
        make_objective(load_config(None, ["--objective", "classify"])),
        batch_size=5,
    )
    with torch.no_grad():
        predicted = [int(model(input_ids=torch.tensor([r.row.input_ids])).logits.argmax()) for r in rows]
    right = [p == r.label for p, r in zip(predicted, rows, strict=True)]
    per_class = [
        sum(ok for ok, r in zip(right, rows, strict=True) if r.label == c) / n
        for c, n in enumerate((12, 3, 1))
    ]
    assert measured["accuracy"] == pytest.approx(sum(right) / len(rows))
    assert measured["balanced_accuracy"] == pytest.approx(sum(per_class) / 3)
    assert len(set(predicted)) > 1  # a model that answers one class would make the two checks alike


def test_keep_best_by_balanced_accuracy(model_dir, tmp_path):
    """`train.best_metric balanced_accuracy` keeps the evaluation with the highest balanced accuracy; other
    objectives refuse it."""
    summary = _run(
        model_dir,
        tmp_path,
        *("--train.steps", "6", "--train.eval_every", "2", "--train.keep_best", "true"),
        *("--train.best_metric", "balanced_accuracy", "--train.lr", "2e-2"),
    )
    lines = (Path(summary["adapter"]).parent / "metrics.jsonl").read_text().splitlines()
    evals = [json.loads(line) for line in lines if "eval_balanced_accuracy" in line]
    assert len(evals) >= 3
    assert summary["after"]["balanced_accuracy"] == max(e["eval_balanced_accuracy"] for e in evals)
    assert summary["best"]["metric"] == "balanced_accuracy"
    with pytest.raises(ConfigError, match="balanced_accuracy is measured with train.objective classify"):
        load_config(None, ["--train.best_metric", "balanced_accuracy"])
