"""lora_bias in the tools that write adapter files: `combine` sums the biases, `extract --lora-bias` carries a
fine-tune's changed biases on B. Each result is checked in lorakit and in PEFT.

Tolerance: as in tests/test_lora_bias.py (float32 logits ~1, agreeing to ~1e-7; 1e-5 allowed).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from test_lora_bias import ATOL, ATTN0, _biases, _out

import lorakit
from lorakit import AdapterError, ConfigError, LoraConfig
from lorakit.cli import main
from lorakit.extract import extract

from tiny import ids, randomize, tiny_gpt2, tiny_llama, tiny_qwen2

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")


# -- combine ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_combine_sums_the_biases_with_the_weights(tmp_path):
    model, x = tiny_qwen2(), ids()
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], lora_bias=True), name="a")
    lorakit.inject(model, LoraConfig(r=2, alpha=2, targets=["q_proj", "v_proj"]), name="b")
    randomize(model, std=0.1)
    _biases(model)
    for name in ("a", "b"):
        lorakit.save_adapter(model, tmp_path / name, name=name)
    lorakit.set_active(model, {"a": 0.7, "b": -1.5})
    want = _out(model, x)
    lorakit.combine([tmp_path / "a", tmp_path / "b"], [0.7, -1.5], "cat", tmp_path / "ab")
    assert json.loads((tmp_path / "ab" / "adapter_config.json").read_text())["lora_bias"] is True
    fresh = tiny_qwen2()
    lorakit.load_adapter(fresh, tmp_path / "ab")
    torch.testing.assert_close(_out(fresh, x), want, atol=ATOL, rtol=0)
    torch.testing.assert_close(
        _out(peft.PeftModel.from_pretrained(tiny_qwen2(), tmp_path / "ab").eval(), x), want, atol=ATOL, rtol=0
    )


def test_combine_refuses_an_embedding_lora_beside_a_lora_bias(tmp_path):
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, targets=["q_proj"], lora_bias=True), name="a")
    lorakit.inject(model, LoraConfig(r=4, targets=["q_proj", "embed_tokens"]), name="b")
    for name in ("a", "b"):
        lorakit.save_adapter(model, tmp_path / name, name=name)
    with pytest.raises(
        AdapterError, match=r"model.embed_tokens: an embedding LoRA cannot be combined with .*/a, which"
    ):
        lorakit.combine([tmp_path / "a", tmp_path / "b"], None, "cat", tmp_path / "ab", allow_missing=True)
    assert not (tmp_path / "ab").exists()


# -- extract ----------------------------------------------------------------------------------------------------


def _qwen2_pair(tmp_path):
    """A Qwen2 whose q_proj weight and bias, and o_proj weight (no bias there), changed."""
    base = tiny_qwen2()
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in ("q_proj", "o_proj"):
            w = tuned.get_submodule(f"{ATTN0}.{name}").weight
            w.add_(torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g) * 0.05)
        tuned.get_submodule(f"{ATTN0}.q_proj").bias.add_(torch.randn(64, generator=g) * 0.1)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    return tmp_path / "base", tmp_path / "tuned", tuned


def test_extract_carries_changed_biases_on_b(tmp_path):
    base_dir, tuned_dir, tuned = _qwen2_pair(tmp_path)
    done = extract(base_dir, tuned_dir, tmp_path / "ad", r=4, lora_bias=True)
    assert done.lora_bias and done.bias == "none" and [m.rank for m in done.loras] == [2, 2]
    tensors = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert not any(k.endswith("base_layer.bias") for k in tensors)
    assert not tensors[f"base_model.model.{ATTN0}.o_proj.lora_B.bias"].any()  # no bias there: b = 0
    x = ids()
    want = tuned(x).logits
    model = tiny_qwen2()  # the base
    lorakit.load_adapter(model, tmp_path / "ad", name="x")
    torch.testing.assert_close(model(x).logits, want, atol=ATOL, rtol=0)
    assert torch.equal(
        model.get_submodule(f"{ATTN0}.q_proj").base_layer.bias,
        tiny_qwen2().get_submodule(f"{ATTN0}.q_proj").bias,
    )  # loading changed nothing of the base
    theirs = peft.PeftModel.from_pretrained(tiny_qwen2(), tmp_path / "ad").eval()
    torch.testing.assert_close(theirs(x).logits, want, atol=ATOL, rtol=0)
    lorakit.merge(model)  # o_proj has no bias, but its b is zero
    torch.testing.assert_close(model(x).logits, want, atol=ATOL, rtol=0)
    assert json.loads((tmp_path / "ad" / "extract.json").read_text())["lora_bias"] is True


def test_extract_without_a_changed_bias_writes_no_lora_bias(tmp_path):
    base = tiny_qwen2()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.get_submodule(f"{ATTN0}.v_proj").weight.add_(0.01)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    done = extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "ad", r=2, lora_bias=True)
    assert not done.lora_bias
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["lora_bias"] is False


@pytest.mark.parametrize(
    "make, changes, message",
    [
        pytest.param(
            tiny_gpt2,
            {"transformer.h.1.mlp.c_proj.bias": None, "transformer.h.0.attn.c_attn.weight": None},
            "lora_bias: the bias of transformer.h.1.mlp.c_proj changed but its weight gets no LoRA",
            id="bias-alone",
        ),
        pytest.param(
            tiny_qwen2,
            {f"{ATTN0}.q_proj.bias": None, "model.embed_tokens.weight": None, f"{ATTN0}.q_proj.weight": None},
            "lora_bias does not work with the embedding LoRA on model.embed_tokens",
            id="embedding",
        ),
    ],
)
def test_extract_with_lora_bias_refuses_what_it_cannot_carry(tmp_path, make, changes, message):
    base = make()
    tuned = copy.deepcopy(base)
    params = dict(tuned.named_parameters())
    with torch.no_grad():
        for name in changes:
            params[name].add_(0.01)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    with pytest.raises(ConfigError) as e:
        extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "ad", r=2, lora_bias=True)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "ad").exists()


def test_extract_cli_flag(tmp_path, capsys):
    base_dir, tuned_dir, _ = _qwen2_pair(tmp_path)
    args = ["extract", "--model", str(base_dir), "--tuned", str(tuned_dir), "--out", str(tmp_path / "ad")]
    assert main([*args, "-r", "4", "--lora-bias"]) == 0
    assert "biases: as each LoRA's bias on B (lora_bias)" in capsys.readouterr().out
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["lora_bias"] is True
    assert main(["inspect", str(tmp_path / "ad")]) == 0
    assert "lora_bias=True" in capsys.readouterr().out
