"""LoftQ initialisation on a 4-bit base: Q + s·B·A approximates W0 better than plain QLoRA's Q alone, one step
keeps the base's codes, more steps re-quantize and are undone by deleting the adapter, files load in PEFT, and a
base that is not quantized (or has lost W0) is refused with the model unchanged. A tiny Llama saved as a folder
with safetensors, loaded with lorakit.load_quantized (which reads W0 back for LoftQ)."""

from __future__ import annotations

import json

import pytest
import torch
from fsdp_worker import char_tokenizer

import lorakit
from lorakit import AdapterError, LoraConfig
from lorakit.quant.loftq import loftq
from lorakit.quant.nf4 import NF4Linear

from tiny import ids, tiny_llama

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(hidden=64).save_pretrained(out)
    char_tokenizer().save_pretrained(out)
    return out


def _w0(folder):
    return {n: p.detach().float() for n, p in tiny_llama(hidden=64).named_parameters()}


def _q_error(model, w0, name, r_adapter="default"):
    """||W0 − (Q + s·B·A)||_F / ||W0||_F for LoRA layer `name`."""
    layer = model.get_submodule(name)
    approx = layer.base_layer.dequantize(torch.float32)
    if r_adapter is not None:
        a = layer.adapters[r_adapter]
        approx = approx + a.scaling * (a.lora_B @ a.lora_A)
    return ((w0[f"{name}.weight"] - approx).norm() / w0[f"{name}.weight"].norm()).item()


def test_loftq_starts_closer_to_w0_than_plain_qlora(folder):
    w0 = _w0(folder)
    name = "model.layers.0.mlp.down_proj"
    errors = {}
    for init, iters in (("default", 1), ("loftq", 1), ("loftq", 4)):
        model, _, _ = lorakit.load_quantized(folder)
        lorakit.inject(model, LoraConfig(r=8, alpha=16, targets="all-linear", init=init, loftq_iter=iters))
        errors[(init, iters)] = _q_error(model, w0, name)
    # a rank-8 correction of a 128x64 weight: NF4's error, mostly noise, shrinks by a good fraction, not to zero
    assert errors[("loftq", 1)] < 0.85 * errors[("default", 1)], errors
    assert errors[("loftq", 4)] <= errors[("loftq", 1)] * 1.001, errors


def test_one_step_keeps_the_codes_and_more_steps_are_undone_by_delete(folder):
    model, _, _ = lorakit.load_quantized(folder)
    layer = model.get_submodule("model.layers.1.self_attn.q_proj")
    codes = {n: b.clone() for n, b in layer.named_buffers()}
    lorakit.inject(model, LoraConfig(r=4, targets=["q_proj"], init="loftq"), "one")
    assert all(
        torch.equal(b, codes[n])
        for n, b in model.get_submodule("model.layers.1.self_attn.q_proj.base_layer").named_buffers()
    )
    lorakit.delete_adapter(model, "one")
    lorakit.inject(model, LoraConfig(r=4, targets=["q_proj"], init="loftq", loftq_iter=3), "three")
    base = model.get_submodule("model.layers.1.self_attn.q_proj.base_layer")
    assert not torch.equal(base.qweight, codes["qweight"])  # NF4(W0 − L·R)
    lorakit.delete_adapter(model, "three")
    assert all(
        torch.equal(b, codes[n])
        for n, b in model.get_submodule("model.layers.1.self_attn.q_proj").named_buffers()
    )


def test_the_algorithm_matches_peft_with_bitsandbytes_step_by_step():
    """PEFT's loop (loftq_utils.loftq_init needs CUDA, so its steps are run here on the CPU): bitsandbytes' NF4
    (blocksize 64, no double quantization, as PEFT quantizes) and PEFT's own `_low_rank_decomposition`. Our Q is
    bit-identical and our L·R equal to float32 SVD rounding."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft.utils.loftq_utils import _low_rank_decomposition

    torch.manual_seed(0)
    w0 = torch.randn(96, 64) * 0.05
    q, left, right = loftq(w0, NF4Linear(64, 96, double_quant=False), r=4, iters=3)
    res = w0
    for i in range(3):
        packed, state = bnb.functional.quantize_4bit(
            res, blocksize=64, quant_type="nf4", compress_statistics=False
        )
        deq = bnb.functional.dequantize_4bit(packed, state)
        out = _low_rank_decomposition(w0 - deq, reduced_rank=4)
        if i + 1 == 3:
            break
        res = w0 - out["L"] @ out["R"]
    torch.testing.assert_close(q.dequantize(torch.float32), deq, atol=0, rtol=0)
    torch.testing.assert_close(left @ right, out["L"] @ out["R"], atol=1e-6, rtol=0)  # signs of U, V are free


def test_a_loftq_adapter_loads_in_peft_and_back(folder, tmp_path):
    x = ids()
    model, _, _ = lorakit.load_quantized(folder)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], init="loftq"))
    with torch.no_grad():
        ours = model(x).logits
    lorakit.save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True  # "loftq" would make PEFT run LoftQ again at load
    back, _, _ = lorakit.load_quantized(folder)
    lorakit.load_adapter(back, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ours, atol=1e-6, rtol=0)
    # PEFT on the dequantized base (its 4-bit path needs CUDA here): the same Q + s·B·A
    plain, _, _ = lorakit.load_quantized(folder)
    lorakit.dequantize(plain)
    theirs = peft.PeftModel.from_pretrained(plain, tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours, atol=1e-5, rtol=0)


def test_loftq_on_a_base_that_is_not_quantized_is_refused_and_the_model_is_unchanged():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        AdapterError, match=r"LoftQ init is for a 4-bit \(NF4\) base, and this layer is a Linear"
    ):
        lorakit.inject(model, LoraConfig(r=4, targets=["q_proj"], init="loftq"))
    assert lorakit.adapter_names(model) == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_loftq_without_w0_is_refused_with_the_way_out():
    model = tiny_llama(hidden=64)
    lorakit.quantize(model)  # in memory: W0 is gone
    with pytest.raises(AdapterError, match=r"needs the full-precision weights, .*load_quantized"):
        lorakit.inject(model, LoraConfig(r=4, targets=["q_proj"], init="loftq"))
    assert lorakit.adapter_names(model) == []


def test_peft_loftq_config_is_read():
    cfg = LoraConfig.from_peft_dict(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "init_lora_weights": "loftq",
         "loftq_config": {"loftq_bits": 4, "loftq_iter": 2}}
    )  # fmt: skip
    assert cfg.init == "loftq" and cfg.loftq_iter == 2
    with pytest.raises(lorakit.ConfigError, match=r"loftq_config=.*4-bit"):
        LoraConfig.from_peft_dict(
            {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
             "loftq_config": {"loftq_bits": 8, "loftq_iter": 1}}
        )  # fmt: skip


def test_train_refuses_loftq_without_a_4bit_base_before_loading():
    from lorakit.train.config import load_config

    with pytest.raises(lorakit.ConfigError, match=r"lora\.init loftq .* add --model\.quantize nf4"):
        load_config(None, ["--lora.init", "loftq"])
    assert load_config(None, ["--lora.init", "loftq", "--model.quantize", "nf4"]).lora.init == "loftq"


def test_an_adapter_whose_loftq_requantized_its_base_says_so_on_load(folder, tmp_path, caplog):
    model, _, _ = lorakit.load_quantized(folder)
    lorakit.inject(model, LoraConfig(r=4, targets=["q_proj"], init="loftq", loftq_iter=2))
    lorakit.save_adapter(model, tmp_path / "a")
    other, _, _ = lorakit.load_quantized(folder)
    with caplog.at_level("WARNING"):
        lorakit.load_adapter(other, tmp_path / "a")
    assert "initialised with LoftQ in 2 steps, which re-quantized its base" in caplog.text
