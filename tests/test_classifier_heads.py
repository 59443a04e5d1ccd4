"""Classifier adapters served over a causal LM (`lorakit.classifier_heads`, `AdapterBank(heads=True)`): their LoRA
pairs on the shared backbone, their heads kept beside it, scored as the classifier's own forward scores them.

The oracle is transformers' `LlamaForSequenceClassification` with the same adapter loaded (PEFT's SEQ_CLS layout),
each text alone. Tolerance 1e-5 in float32: the rows are batched with right padding here, alone there, and the
head is applied to the pooled state here, to every position there (the same products, summed in another order).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.bank import AdapterBank
from lorakit.classifier_heads import head_scores, pooled_positions, read_head
from lorakit.errors import AdapterError
from lorakit.models import load_model

from seqcls_oracle import random_classifier
from tiny import snapshot, unchanged
from trl_dpo_oracle import build_tiny_model

TEXTS = ["great", "a much longer sentence, about nothing at all", "so-so, I guess"]
CLASSES = ["negative", "neutral", "positive"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("heads")
    model_dir = build_tiny_model(default_model_dir, root / "model")
    return {
        "model": model_dir,
        "cls": random_classifier(model_dir, root / "cls", 3, seed=1, names=CLASSES),
        "cls2": random_classifier(model_dir, root / "cls2", 3, seed=2, names=CLASSES),
        "rm": random_classifier(model_dir, root / "rm", 1, seed=3),
        "root": root,
    }


def _oracle(model_dir: Path, adapter: Path, rows: list[list[int]]) -> torch.Tensor:
    labels = 1 if "rm" in adapter.name else 3
    model, _ = load_model(str(model_dir), num_labels=labels, dtype=torch.float32)
    lorakit.load_adapter(model, adapter)
    with torch.no_grad():
        return torch.cat([model.eval()(input_ids=torch.tensor([r])).logits for r in rows])


def _served(model_dir: Path):
    model, tok = load_model(str(model_dir), dtype=torch.float32)
    return model, tok, AdapterBank(model, heads=True)


def test_a_causal_lm_scores_as_the_classifier_does(folders):
    model, tok, bank = _served(folders["model"])
    bank.load("cls", folders["cls"])
    bank.load("rm", folders["rm"])
    rows = [tok(t)["input_ids"] for t in TEXTS]
    for name in ("cls", "rm"):
        head = bank.head(name)
        with bank.use([name] * len(rows)):  # one batch, right-padded
            got = head_scores(model, head, rows, tok.pad_token_id)
        want = _oracle(folders["model"], folders[name], rows)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert bank.head("cls").classes == tuple(CLASSES)
    assert bank.head("rm").classes == ("LABEL_0",) and bank.head("rm").outputs == 1


def test_the_generation_path_is_untouched_by_a_classifier_beside_it(folders):
    """The causal LM's logits with no adapter, and with a classifier loaded, equal a plain model's."""
    model, tok, bank = _served(folders["model"])
    plain, _ = load_model(str(folders["model"]), dtype=torch.float32)
    x = torch.tensor([tok(TEXTS[1])["input_ids"]])
    bank.load("cls", folders["cls"])
    with torch.no_grad(), bank.use([None]):
        torch.testing.assert_close(model(input_ids=x).logits, plain(input_ids=x).logits, atol=0, rtol=0)


def test_pooling_reads_the_last_token_that_is_not_the_pad_token(folders):
    """A row whose last tokens are the pad id (SmolLM2's pad is a real token, <|im_end|>): transformers pools the
    token before them, and so must the served head."""
    model, tok, bank = _served(folders["model"])
    bank.load("cls", folders["cls"])
    pad = tok.pad_token_id
    rows = [tok(TEXTS[0])["input_ids"] + [pad, pad], tok(TEXTS[1])["input_ids"]]
    with bank.use(["cls", "cls"]):
        got = head_scores(model, bank.head("cls"), rows, pad)
    torch.testing.assert_close(got, _oracle(folders["model"], folders["cls"], rows), atol=1e-5, rtol=0)
    ids = torch.tensor([[5, pad, 7, pad, pad], [pad, pad, pad, pad, pad]])
    assert pooled_positions(ids, pad).tolist() == [2, 0]
    assert pooled_positions(ids, None).tolist() == [4, 4]


def test_unload_and_replace_keep_heads_with_their_leases(folders):
    model, tok, bank = _served(folders["model"])
    bank.load("cls", folders["cls"])
    first = bank.head("cls")
    with bank.hold(["cls"]) as (slot,):
        bank.load("cls", folders["cls2"], replace=True)  # the old slot stays for this lease
        assert bank.heads[slot] is first and bank.head("cls") is not first
        assert not torch.equal(bank.head("cls").weight, first.weight)
    assert slot not in bank.heads  # gone with its last lease
    bank.unload("cls")
    assert bank.heads == {}


def test_a_bank_without_heads_refuses_a_classifier(folders):
    model, _ = load_model(str(folders["model"]), dtype=torch.float32)
    bank = AdapterBank(model)
    with pytest.raises(AdapterError, match="lacks: it is a SEQ_CLS adapter"):
        bank.load("rm", folders["rm"])
    assert bank.names() == []


def _edit(src: Path, dst: Path, tensors=None, config=None) -> Path:
    shutil.copytree(src, dst)
    if tensors is not None:
        file = dst / "adapter_model.safetensors"
        save_file(tensors(load_file(file)), file)
    if config is not None:
        file = dst / "adapter_config.json"
        file.write_text(json.dumps(config(json.loads(file.read_text()))))
    return dst


@pytest.mark.parametrize(
    ("tensors", "config", "words"),
    [
        (
            lambda t: {k: v for k, v in t.items() if "score" not in k},
            None,
            "without its head",
        ),
        (
            lambda t: {**t, "base_model.model.score.extra": torch.zeros(3)},
            None,
            "is not one linear layer",
        ),
        (
            lambda t: {**t, "base_model.model.score.weight": torch.zeros(3, 7)},
            None,
            "is not one linear layer",
        ),
        (
            lambda t: {**t, "base_model.model.score.bias": torch.zeros(2)},
            None,
            "bias has shape",
        ),
        (
            lambda t: {**t, "base_model.model.classifier.weight": torch.zeros(3, 64)},
            lambda c: {**c, "modules_to_save": ["score", "classifier"]},
            "holds 2 heads",
        ),
    ],
    ids=["no head", "extra tensor", "wrong width", "bias", "two heads"],
)
def test_a_bad_head_is_refused_and_the_bank_is_untouched(folders, tmp_path, tensors, config, words):
    model, _, bank = _served(folders["model"])
    bank.load("ok", folders["cls"])
    before = snapshot(model)
    bad = _edit(folders["cls"], tmp_path / "bad", tensors, config)
    with pytest.raises(AdapterError, match=words) as err:
        bank.load("bad", bad)
    assert "\n" not in str(err.value)
    assert bank.names() == ["ok"] and list(bank.heads) == ["ok"]
    assert unchanged(model, before)


def test_class_names_must_match_the_head(folders, tmp_path):
    from lorakit.formats import LABELS_KEY
    from lorakit.readers import safetensors_metadata

    src = folders["cls"] / "adapter_model.safetensors"
    meta = {**safetensors_metadata(src), LABELS_KEY: json.dumps(["a", "b"])}
    bad = _edit(folders["cls"], tmp_path / "bad")
    save_file(load_file(src), bad / "adapter_model.safetensors", metadata=meta)
    model, _ = load_model(str(folders["model"]), dtype=torch.float32)
    with pytest.raises(AdapterError, match="3 outputs but it names 2 classes"):
        read_head(model, bad)


def test_another_adapter_has_no_head(folders):
    model, tok = load_model(str(folders["model"]), dtype=torch.float32)
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["q_proj"]))
    folder = lorakit.save_adapter(model, folders["root"] / "gen")
    _, _, bank = _served(folders["model"])
    bank.load("gen", folder)
    assert bank.head("gen") is None and read_head(model, folder) is None
