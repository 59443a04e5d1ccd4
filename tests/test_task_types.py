"""Adapters for models that are not causal LMs: the task_type lorakit writes makes PEFT build the wrapper that
fits (PeftModel.from_pretrained picks its class by task_type; CAUSAL_LM on a BERT encoder fails), and PEFT's
adapters for those models load in lorakit. Tiny BERTs from a config, random weights, no download."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.formats import task_type_for

from tiny import randomize, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

# Same float32 ops in a different order (PEFT's forward vs ours): agreement to float32 rounding of outputs of
# size ~1 after two layers; 1e-5 leaves room for that and fails on any wrong scaling or missed module.
ATOL = 1e-5


def _bert(cls_name: str, seed: int = 0):
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
    )
    torch.manual_seed(seed)
    return getattr(transformers, cls_name)(cfg).eval()


def _ids():
    return torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))


def _out(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


@pytest.mark.parametrize(
    "model,expected",
    [
        (lambda: _bert("BertModel"), None),
        (lambda: _bert("BertForSequenceClassification"), "SEQ_CLS"),
        (lambda: _bert("BertForTokenClassification"), "TOKEN_CLS"),
        (lambda: _bert("BertForQuestionAnswering"), "QUESTION_ANS"),
        (lambda: _bert("BertForMaskedLM"), None),
        (tiny_llama, "CAUSAL_LM"),
        (tiny_gpt2, "CAUSAL_LM"),
        (lambda: torch.nn.Sequential(torch.nn.Linear(4, 4)), None),
    ],
)
def test_task_type_fits_the_model(model, expected):
    assert task_type_for(model()) == expected


def test_seq2seq_models_are_seq_2_seq_lm():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    assert task_type_for(T5ForConditionalGeneration(cfg)) == "SEQ_2_SEQ_LM"


@pytest.mark.parametrize("cls_name", ["BertModel", "BertForSequenceClassification"])
def test_lorakit_adapter_on_an_encoder_loads_in_peft(tmp_path, cls_name):
    import peft

    ours = _bert(cls_name)
    lorakit.inject(ours, LoraConfig(r=4, alpha=8, targets=["query", "value"]))
    randomize(ours, std=0.5)  # a head's logits are ~0.01 at init: a clear change needs a big update
    path = lorakit.save_adapter(ours, tmp_path / "adapter")
    written = json.loads((path / "adapter_config.json").read_text())["task_type"]
    assert written == task_type_for(_bert(cls_name))

    theirs = peft.PeftModel.from_pretrained(_bert(cls_name), path).eval()
    ids = _ids()
    with torch.no_grad():
        want, got = _out(ours, ids), _out(theirs, ids)
        base = _out(_bert(cls_name), ids)
    assert (want - base).abs().max() > 1e-3  # the adapter does change the output
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_peft_adapter_on_a_bare_encoder_loads_in_lorakit(tmp_path):
    import peft

    from tiny import perturb_peft

    pm = peft.get_peft_model(
        _bert("BertModel"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])
    )
    perturb_peft(pm, std=0.1)
    pm.save_pretrained(tmp_path / "peft")
    ours = _bert("BertModel")
    lorakit.load_adapter(ours, tmp_path / "peft")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(_out(ours, ids), _out(pm.eval(), ids), atol=ATOL, rtol=0)
    lorakit.save_adapter(ours, tmp_path / "again")  # and back: PEFT loads lorakit's copy
    again = peft.PeftModel.from_pretrained(_bert("BertModel"), tmp_path / "again").eval()
    with torch.no_grad():
        torch.testing.assert_close(_out(again, ids), _out(ours, ids), atol=ATOL, rtol=0)


def _peft_classifier(trained_head: bool):
    import peft

    from tiny import perturb_peft

    pm = peft.get_peft_model(
        _bert("BertForSequenceClassification"),
        peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"]),
    )
    perturb_peft(pm, std=0.1)
    if trained_head:
        with torch.no_grad():
            pm.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    return pm.eval()


def test_peft_classifier_adapter_with_its_untouched_head_loads_in_lorakit(tmp_path):
    """PEFT's SEQ_CLS adapters always carry a copy of the classifier head (modules_to_save). An untrained copy is
    the model's own head: lorakit loads the LoRA weights and gets PEFT's outputs."""
    pm = _peft_classifier(trained_head=False)
    pm.save_pretrained(tmp_path / "peft")
    ours = _bert("BertForSequenceClassification")
    lorakit.load_adapter(ours, tmp_path / "peft")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(_out(ours, ids), _out(pm, ids), atol=ATOL, rtol=0)


def test_peft_classifier_adapter_with_a_trained_head_loads_in_lorakit_and_back(tmp_path):
    """A trained head copy (PEFT's modules_to_save) loads as the adapter's own copy of the head: PEFT's outputs,
    and lorakit's file loads back in PEFT with the same outputs."""
    pm = _peft_classifier(trained_head=True)
    pm.save_pretrained(tmp_path / "peft")
    ours = _bert("BertForSequenceClassification")
    lorakit.load_adapter(ours, tmp_path / "peft")
    ids = _ids()
    with torch.no_grad():
        want = _out(pm, ids)
        torch.testing.assert_close(_out(ours, ids), want, atol=ATOL, rtol=0)
        with lorakit.disabled(ours):
            assert (_out(ours, ids) - want).abs().max() > 1e-2  # the head copy is what differs
    lorakit.save_adapter(ours, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(_bert("BertForSequenceClassification"), tmp_path / "again").eval()
    with torch.no_grad():
        torch.testing.assert_close(_out(again, ids), want, atol=ATOL, rtol=0)


def test_an_explicit_task_type_is_kept(tmp_path):
    model = _bert("BertModel")
    lorakit.inject(model, LoraConfig(r=2, targets=["query"], task_type="FEATURE_EXTRACTION"))
    path = lorakit.save_adapter(model, tmp_path / "a")
    assert json.loads((path / "adapter_config.json").read_text())["task_type"] == "FEATURE_EXTRACTION"
