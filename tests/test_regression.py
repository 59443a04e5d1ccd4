"""Regression (`train.objective regression`): texts labelled with numbers (GLUE's STS-B), a head with one output
trained with the squared error. The data and its errors, training against PEFT + transformers' own regression
loss, the correlations, the adapter's metadata, eval, merge, serving, the refused settings and the real default
model.

The tiny model is a random 2-layer Llama with SmolLM2's real tokenizer (trl_dpo_oracle's), loaded as a sequence
classifier with one output."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.data.files import DataError
from lorakit.data.labels import encode_targets, labelled_of, read_labelled
from lorakit.errors import ConfigError
from lorakit.formats import adapter_problem
from lorakit.models import load_model
from lorakit.train.config import RunConfig, TrainSection, load_config
from lorakit.train.correlation import pearson, ranks
from lorakit.train.evaluate import regression_eval
from lorakit.train.objectives import make_objective
from lorakit.train.run import run_training

from seqcls_oracle import lorakit_steps, matches_peft, merge_matches, peft_steps, random_start
from tiny import cli_here
from trl_dpo_oracle import build_tiny_model

ROWS = [
    {"text": "A man plays a guitar.", "text_pair": "Someone makes music.", "label": 3.8},
    {"text": "A cat sleeps.", "text_pair": "The stock market fell.", "label": 0},
    {"text": "Two dogs run in a park.", "text_pair": "Dogs are running outside.", "label": "4.2"},
    {"text": "A woman cuts an onion.", "text_pair": "A woman slices a vegetable.", "label": 3.5},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, default_model_dir):
    return build_tiny_model(default_model_dir, tmp_path_factory.mktemp("regression") / "model")


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_numbers_are_read_as_targets(tmp_path):
    items = read_labelled(_jsonl(tmp_path / "sts.jsonl", ROWS), scores=True)
    assert [it["label"] for it in items] == [3.8, 0.0, 4.2, 3.5]
    csv = tmp_path / "sts.csv"
    csv.write_text("sentence1,sentence2,score\nA,B,1.5\nC,D,-2\n")
    items = read_labelled(csv, {"text": "sentence1", "text_pair": "sentence2", "label": "score"}, scores=True)
    assert [(it["text_pair"], it["label"]) for it in items] == [("B", 1.5), ("D", -2.0)]


@pytest.mark.parametrize(
    ("label", "words"),
    [
        ("high", "'high' is not a finite number"),
        (True, "True is not a finite number"),
        ("nan", "'nan' is not a"),
        (None, "None is not"),
    ],
)
def test_a_bad_target_is_refused_naming_the_record(tmp_path, label, words):
    rows = [ROWS[0], {"text": "x", "label": label}]
    with pytest.raises(DataError, match=rf"sts.jsonl.*2.*{words}"):
        read_labelled(_jsonl(tmp_path / "sts.jsonl", rows), scores=True)


def test_equal_targets_are_refused_before_the_model_loads(tmp_path):
    data = _jsonl(tmp_path / "same.jsonl", [{"text": f"t{i}", "label": 1.0} for i in range(8)])
    args = [
        "--objective",
        "regression",
        "--data.train_file",
        str(data),
        "--train.out_dir",
        str(tmp_path / "r"),
    ]
    with pytest.raises(DataError, match="a regression needs two values"):
        run_training(load_config(None, args))
    assert not (tmp_path / "r" / "adapter").exists()


def _spearman_by_hand(x: list[float], y: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        ordered = sorted(v)
        return [sum(i + 1 for i, o in enumerate(ordered) if o == a) / ordered.count(a) for a in v]

    return statistics.correlation(ranks(x), ranks(y))


def test_the_correlations_are_pearson_s_and_spearman_s():
    x = [1.0, 2.0, 2.0, 5.0, 3.5, -1.0]
    y = [10.0, 30.0, 20.0, 40.0, 40.0, 0.0]
    assert pearson(torch.tensor(x), torch.tensor(y)) == pytest.approx(statistics.correlation(x, y), abs=1e-12)

    spearman = pearson(ranks(torch.tensor(x)), ranks(torch.tensor(y)))
    assert spearman == pytest.approx(_spearman_by_hand(x, y), abs=1e-12)
    assert (
        pearson(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 2.0])) == 0.0
    )  # a constant: nothing to correlate


def test_training_equals_peft_with_transformers_regression_loss(model_dir, tmp_path):
    """3 steps on one batch of text pairs: every step's loss and the trained adapter (LoRA and head) to 1e-5
    against PEFT + transformers' regression loss + torch's AdamW (float32, the same forward; only kernels'
    summation order differs)."""
    from lorakit.train.schedule import collate

    model, tok, start = random_start(model_dir, tmp_path / "start", 1)
    items = labelled_of([(f"r{i}", r) for i, r in enumerate(ROWS)], "rows", {}, scores=True)
    rows, _ = encode_targets(tok, items, [it["label"] for it in items], max_len=64)
    ours_losses, objective = lorakit_steps(model, tok, rows, tmp_path / "run", "regression")
    batch = collate(objective.encoded(rows), tok.pad_token_id)
    targets = torch.tensor([float(r.label) for r in rows])
    losses, theirs = peft_steps(
        model_dir, start, batch, targets, steps=3, lr=5e-3, num_labels=1, problem_type="regression"
    )
    matches_peft(ours_losses, losses, model, theirs)


def _run(model_dir: Path, tmp_path: Path, *overrides: str) -> dict:
    args = ["--model.path", str(model_dir), "--objective", "regression", "--model.dtype", "float32"]
    args += ["--data.n_train", "64", "--data.n_eval", "16", "--train.steps", "12", "--train.batch_size", "8"]
    args += ["--train.lr", "5e-4", "--train.out_dir", str(tmp_path / "run"), "--train.save_every", "0"]
    return run_training(load_config(None, [*args, *overrides]))


@pytest.fixture(scope="module")
def trained(model_dir, tmp_path_factory):
    return _run(model_dir, tmp_path_factory.mktemp("trained"))


def test_a_run_learns_and_saves_a_regression(trained, model_dir, tmp_path, capsys):
    """The built-in dates labelled with their year: the squared error falls, the evaluations report the
    correlations, the adapter says it is a regression's (PEFT's SEQ_CLS layout, one output); lorakit eval
    measures it as the run did; `lorakit merge` writes a classifier whose config says regression and whose outputs
    are the adapter's."""
    before, after = trained["before"], trained["after"]
    assert set(before) == {"loss", "pearson", "spearman"} and after["loss"] < before["loss"]
    assert after["pearson"] > before["pearson"] + 0.1
    adapter = Path(trained["adapter"])
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    assert adapter_problem(adapter) == "regression" and lorakit.formats.adapter_num_labels(adapter) == 1
    proc = cli_here(
        capsys,
        "eval",
        "--model",
        str(model_dir),
        "--adapter",
        str(adapter),
        "--task",
        "dates",
        "--limit",
        "16",
        "--dtype",
        "float32",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])["adapter"]
    for k in ("loss", "pearson", "spearman"):
        assert report[k] == pytest.approx(after[k], abs=1e-4), k
    config = merge_matches(capsys, model_dir, adapter, tmp_path / "merged", ["2020-01-02", "03/04/1999"], 1)
    assert config["problem_type"] == "regression"


def test_a_served_regression_reads_texts_as_training_did(trained, model_dir):
    """Beside a causal LM (lorakit serve's bank), the head says regression, so its texts are tokenized as the
    classifier's input, not as a reward model's text example; the scores equal the eval's predictions."""
    from lorakit.bank import AdapterBank
    from lorakit.classifier_heads import head_scores

    model, tok = load_model(str(model_dir), dtype=torch.float32)
    bank = AdapterBank(model, heads=True)
    bank.load("reg", trained["adapter"])
    head = bank.head("reg")
    assert head.problem == "regression" and head.outputs == 1
    texts = ["2020-01-02", "the 3rd of April, 1999"]
    rows = [tok(t)["input_ids"] for t in texts]
    with bank.use(["reg", "reg"]):
        got = head_scores(model, head, rows, tok.pad_token_id)[:, 0]
    clf, _ = load_model(str(model_dir), num_labels=1, dtype=torch.float32)
    lorakit.load_adapter(clf, trained["adapter"])
    items = [{"text": t, "text_pair": None, "label": 0.0} for t in texts]
    enc, _ = encode_targets(tok, items, [0.0, 0.0], max_len=64)
    objective = make_objective(RunConfig(train=TrainSection(objective="regression")))
    want = regression_eval(
        clf, enc, tok.pad_token_id, objective
    )  # MSE against 0 = the predictions' mean square
    assert float((got**2).mean()) == pytest.approx(want["loss"], abs=1e-5)


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (
            ["--classify.class_weights", "balanced"],
            "classify.class_weights is set but train.objective is 'regression'",
        ),
        (["--train.best_metric", "accuracy"], "a classifier's; a regression's are loss"),
        (["--train.best_metric", "balanced_accuracy"], "a classifier's"),
        (["--data.pack", "true"], "data.pack does not work with train.objective regression"),
        (["--train.method", "ladder"], "ladder"),
    ],
)
def test_refused_settings(overrides, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, ["--objective", "regression", *overrides])


def test_pearson_is_a_regression_s_best_metric():
    load_config(None, ["--objective", "regression", "--train.best_metric", "pearson"])
    with pytest.raises(ConfigError, match="pearson is measured with train.objective regression"):
        load_config(None, ["--objective", "classify", "--train.best_metric", "pearson"])


@pytest.mark.real_model
def test_smollm2_learns_the_years_of_dates(tmp_path):
    """The real default model, 20 float32 steps on the built-in dates labelled with their year: the held-out
    Pearson correlation goes from about 0 to over 0.8."""
    args = ["--objective", "regression", "--model.dtype", "float32", "--train.steps", "20"]
    args += ["--data.n_eval", "40", "--train.out_dir", str(tmp_path / "run"), "--train.save_every", "0"]
    summary = run_training(load_config(None, args))
    assert summary["after"]["pearson"] > 0.8 > abs(summary["before"]["pearson"]) + 0.3
    assert summary["after"]["loss"] < summary["before"]["loss"] / 4
