"""QLoRA's files: adapters trained on a 4-bit base are plain PEFT layout (PEFT loads them silently, and they load
on the full-precision base), merging into the dequantized base, `inspect`'s bits per parameter, `lorakit train
--model.quantize nf4`, the real default model in NF4 (against fp32 and bitsandbytes), and loading a checkpoint
straight into 4 bits. The kernels and layers themselves are tested in test_quant.py.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open
from test_quant import bnb, bnbf

import lorakit
import lorakit.models
from lorakit import LoraConfig
from lorakit.export import merge_to_folder
from lorakit.quant.nf4 import NF4Linear

from runs import addition_run
from tiny import ids, randomize, tiny_llama


def test_adapter_from_a_4bit_base_is_plain_peft_layout_and_loads_on_full_precision(tmp_path, caplog):
    cfg = LoraConfig(r=4, alpha=8, targets="all-linear")
    fp = tiny_llama()
    lorakit.inject(fp, cfg)
    lorakit.save_adapter(fp, tmp_path / "fp")
    q = tiny_llama()
    lorakit.quantize(q)
    lorakit.inject(q, cfg)
    randomize(q)
    lorakit.save_adapter(q, tmp_path / "q")
    assert (tmp_path / "q/adapter_config.json").read_text() == (
        tmp_path / "fp/adapter_config.json"
    ).read_text()
    t_q, t_fp = lorakit.adapter_state_dict(q), lorakit.adapter_state_dict(fp)
    assert {k: v.shape for k, v in t_q.items()} == {k: v.shape for k, v in t_fp.items()}
    with safe_open(str(tmp_path / "q/adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert json.loads(meta["lorakit.base_quantization"]) == {
        "block_size": 64,
        "double_quant": True,
        "method": "nf4",
        "skip": ["lm_head"],
    }
    target = tiny_llama()
    with caplog.at_level(logging.WARNING, logger="lorakit.quant"):
        lorakit.load_adapter(target, tmp_path / "q")
    assert "trained on a nf4-quantized base" in caplog.text
    for k, v in lorakit.adapter_state_dict(target).items():
        assert torch.equal(v, t_q[k]), k
    caplog.clear()
    lorakit.delete_adapter(target, "default")
    lorakit.quantize(target)
    with caplog.at_level(logging.WARNING, logger="lorakit.quant"):
        lorakit.load_adapter(target, tmp_path / "q")  # onto a 4-bit base: the training-time model, no note
    assert caplog.text == ""
    with torch.no_grad():
        torch.testing.assert_close(target(ids()).logits, q(ids()).logits, atol=0, rtol=0)


def test_peft_loads_an_adapter_trained_on_a_4bit_base_silently(tmp_path, recwarn):
    peft = pytest.importorskip("peft")
    q = tiny_llama()
    lorakit.quantize(q)
    lorakit.inject(q, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    randomize(q)
    lorakit.save_adapter(q, tmp_path / "q")
    recwarn.clear()
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "q"))
    assert not [w for w in recwarn if "Unexpected" in str(w.message)]
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
    got = dict(pm.named_parameters())[name]
    want = lorakit.adapter_state_dict(q)["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert torch.equal(got, want)


class _NoTokenizer:
    def save_pretrained(self, path):
        pass


def _tiny_loader(monkeypatch, hidden: int = 32):
    """`merge_to_folder` loads `tiny_llama()` (same seed: the base the adapters were made on), no tokenizer."""
    monkeypatch.setattr(
        lorakit.models,
        "load_model",
        lambda spec, dtype, device=None, num_labels=None, per_token=False, bare=False: (
            tiny_llama(hidden=hidden),
            _NoTokenizer(),
        ),
    )


def test_merge_to_folder_merges_into_the_dequantized_base(tmp_path, monkeypatch):
    """`lorakit merge` on a QLoRA adapter writes W = dequant(quant(W0)) + ΔW: the model it was trained as."""
    from transformers import AutoModelForCausalLM

    _tiny_loader(monkeypatch)
    q, x = tiny_llama(), ids()
    lorakit.quantize(q)
    lorakit.inject(q, LoraConfig(r=4, targets="all-linear"))
    randomize(q)
    lorakit.save_adapter(q, tmp_path / "adapter")
    merge_to_folder("tiny", tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert all(type(m) is not NF4Linear for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, q(x).logits, atol=1e-5, rtol=0)
    merge_to_folder("tiny", tmp_path / "adapter", tmp_path / "onto_w0", dequantized_base=False)
    onto_w0 = AutoModelForCausalLM.from_pretrained(tmp_path / "onto_w0")
    with torch.no_grad():
        assert (onto_w0(x).logits - q(x).logits).abs().max() > 1e-3  # W0 + ΔW is another model


def test_inspect_reports_bits_per_parameter():
    model = tiny_llama()
    lorakit.quantize(model)
    lorakit.inject(model, LoraConfig(r=4))
    report = lorakit.parameter_report(model)
    q = report["quantization"]
    assert q["layers"] == 14 and q["params"] == sum(r["full"] for r in report["layers"])
    assert report["total"] == sum(p.numel() for p in tiny_llama().parameters()) + report["trainable"]
    assert "bits/param" in lorakit.format_report(report)


def test_train_with_model_quantize_nf4(tmp_path):
    """`lorakit train --model.quantize nf4` through run_training on a tiny model: QLoRA end to end."""
    summary, model = addition_run(
        tmp_path, "--model.quantize", "nf4", "--train.steps", "4", "--train.save_every", "0", "--lora.r", "4"
    )
    assert summary["quantization"]["layers"] == 14 and summary["quantization"]["bits_per_param"] < 4.2
    assert any(isinstance(m, NF4Linear) for m in model.modules())
    with safe_open(str(tmp_path / "run/adapter/adapter_model.safetensors"), "pt") as f:
        assert "lorakit.base_quantization" in f.metadata()
    from lorakit.train.config import load_config

    with pytest.raises(lorakit.ConfigError, match="model.quantize must be nf4"):
        load_config(None, ["--model.quantize", "int8"])


@pytest.mark.real_model
def test_real_model_nf4_storage_and_logits(default_model_dir):
    """SmolLM2-135M with every linear layer but the (tied) head in NF4: ≤ 4.13 bits per quantized weight; codes
    equal to bitsandbytes' on real weights; logits close to fp32.

    Measured on this 52-token prompt: greedy next token equal to fp32's at 73% of positions, 90% of the 30 where
    fp32 is confident (p > 0.5); KL(fp32 ‖ NF4) 0.31 nats per token; max |Δlogit| 14, mean 1.8. Bit-identical to
    bitsandbytes, so this is NF4 on a 135M model, not our rounding. Bounds: 65% / 85% / KL < 0.5.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(default_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    text = (
        "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
        "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889."
    )
    x = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(x).logits[0]
    real = {n: model.get_submodule(n).weight.detach().clone() for n in ("model.layers.0.mlp.down_proj",)}
    report = lorakit.quantize(model)
    assert len(report.quantized) == 30 * 7 and report.bits_per_param <= 4.13, report.summary()
    assert lorakit.parameter_report(model)["quantization"]["bits_per_param"] <= 4.13
    if bnb is not None:
        for name, w in real.items():
            b_packed, st = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
            layer = model.get_submodule(name)
            assert torch.equal(layer.qweight, b_packed.view(-1)) and torch.equal(layer.absmax, st.absmax)
    with torch.no_grad():
        got = model(x).logits[0]
    diff = (got - ref).abs()
    p, q = ref.log_softmax(-1), got.log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    same = got.argmax(-1) == ref.argmax(-1)
    confident = p.exp().amax(-1) > 0.5
    agree, agree_conf = same.float().mean().item(), same[confident].float().mean().item()
    print(
        f"NF4 vs fp32 logits: max |diff| {diff.max():.2f}, mean {diff.mean():.3f}, KL {kl:.3f}, top-1 agreement "
        f"{agree:.1%} ({agree_conf:.1%} where fp32 is confident, {int(confident.sum())} positions)"
    )
    assert agree >= 0.65 and agree_conf >= 0.85 and kl < 0.5
    streamed, _, _ = lorakit.load_quantized(default_model_dir)  # straight into 4 bits: the same model
    a, b = model.state_dict(), streamed.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def _model_folder(tmp_path, default_model_dir, *, tied: bool, name: str = "m"):
    """A tiny Llama saved as a Hugging Face folder, with the default model's tokenizer files next to it."""
    import shutil

    model = tiny_llama()
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    folder = tmp_path / name
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / f, folder / f)
    return folder


@pytest.mark.parametrize("tied", [False, True])
def test_load_quantized_equals_load_then_quantize(tmp_path, default_model_dir, tied):
    """Streaming the checkpoint into 4 bits gives exactly the model that loading in full precision and then
    quantizing gives: the same tensors, bit for bit, and the same logits (exact: same codes, same arithmetic)."""
    folder = _model_folder(tmp_path, default_model_dir, tied=tied)
    ref, _ = lorakit.load_model(folder)
    ref_report = lorakit.quantize(ref, skip=())
    got, tok, report = lorakit.load_quantized(folder, skip=())
    assert report.quantized == ref_report.quantized and tok.pad_token is not None
    assert report.bits_per_param == ref_report.bits_per_param
    if tied:  # the tied head stays full precision and tied
        assert "lm_head" in report.skipped and got.lm_head.weight is got.model.embed_tokens.weight
    a, b = ref.state_dict(), got.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = ids(vocab=ref.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(ref(x).logits, got(x).logits)
    assert lorakit.quant.base_quantization(got)["method"] == "nf4"


def test_load_quantized_falls_back_when_checkpoint_names_differ(tmp_path, default_model_dir, caplog):
    """A checkpoint with a tensor the model does not have cannot be streamed name by name: it is loaded the
    normal way and then quantized, with a warning, and the result is the same."""
    from safetensors.torch import load_file, save_file

    folder = _model_folder(tmp_path, default_model_dir, tied=False)
    tensors = load_file(folder / "model.safetensors")
    save_file(
        {**tensors, "extra.unused": torch.zeros(3)}, folder / "model.safetensors", metadata={"format": "pt"}
    )
    ref, _ = lorakit.load_model(folder)
    lorakit.quantize(ref)
    with caplog.at_level(logging.WARNING):
        got, _, _ = lorakit.load_quantized(folder)
    assert "checkpoint names differ" in caplog.text and "extra.unused" in caplog.text
    a, b = ref.state_dict(), got.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
