"""QLoRA on bitsandbytes' layers: a model loaded with transformers' BitsAndBytesConfig(load_in_4bit=True) takes
lorakit adapters; lorakit reads bitsandbytes' Linear4bit weights exactly, also after bitsandbytes repacked them for
its AVX512-BF16 CPU kernel, and never writes into them; 8-bit layers are refused. Skipped only when bitsandbytes
cannot be imported (it is in the `test` extra)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_quant import LAYER_ATOL, bnb, bnbf, needs_bnb
from test_quant_files import _tiny_loader
from torch import nn

import lorakit
from lorakit import LoraConfig, QuantizationError
from lorakit.export import merge_to_folder
from lorakit.handlers import handler_for
from lorakit.quant import bnb as bnb_interop
from lorakit.quant.handlers import QuantLinearHandler

from tiny import ids, randomize, tiny_llama


@needs_bnb
def test_lora_on_bitsandbytes_linear4bit(tmp_path, monkeypatch):
    """A model loaded with transformers' BitsAndBytesConfig(load_in_4bit=True) takes lorakit adapters: forward =
    linear with the dequantized weight + s·B·A·x. Since our NF4 is bitsandbytes' bit for bit, the same adapter
    on our NF4 base gives the same logits, and `lorakit merge` rebuilds the training-time model exactly."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # 64 features: bitsandbytes 0.50's CPU dequantize is wrong for layers with fewer input features than one
    # block of 64 on AVX-512 CPUs (see test_bitsandbytes_dequantize_is_the_nf4_table_by_hand); real models have more
    tiny_llama(hidden=64).save_pretrained(tmp_path / "tiny")
    cfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", quantization_config=cfg, device_map="cpu")
    # Train mode keeps bitsandbytes on its standard NF4 path: in eval mode without grad, on a CPU with
    # AVX512-BF16, it repacks each layer for a bf16 kernel, rounding the constants (see the next tests). Dropout
    # is 0, so train and eval compute the same.
    model.train()
    base_q = model.model.layers[0].self_attn.q_proj
    assert isinstance(base_q, bnb.nn.Linear4bit)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets="all-linear"))
    randomize(model)
    layer = model.model.layers[0].self_attn.q_proj
    assert type(handler_for(base_q)).__name__ == "Bnb4bitHandler" and isinstance(
        layer.handler, QuantLinearHandler
    )
    ad = layer.adapters["default"]
    x = torch.randn(2, 3, 64)
    w = bnbf.dequantize_4bit(base_q.weight.data, base_q.weight.quant_state)
    with torch.no_grad():
        want = F.linear(x, w) + 2.0 * (x @ ad.lora_A.T @ ad.lora_B.T)
        torch.testing.assert_close(layer(x), want, atol=LAYER_ATOL, rtol=0)
    lorakit.save_adapter(model, tmp_path / "adapter")
    ours = tiny_llama(hidden=64)
    lorakit.quantize(ours)
    lorakit.load_adapter(ours, tmp_path / "adapter")
    t = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(t).logits, model(t).logits, atol=1e-5, rtol=0)
    with pytest.raises(QuantizationError, match="Linear4bit"):
        lorakit.merge(model)
    with pytest.raises(QuantizationError, match="already quantized"):
        lorakit.quantize(model)
    stats = lorakit.parameter_report(model)["quantization"]
    assert stats["method"] == "bitsandbytes-nf4" and stats["bits_per_param"] < 4.5
    # `lorakit merge` reproduces the bitsandbytes base with our NF4, then merges; lorakit.dequantize in memory
    _tiny_loader(monkeypatch, hidden=64)
    merge_to_folder("tiny", tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        want = model(t).logits
        torch.testing.assert_close(merged(t).logits, want, atol=1e-5, rtol=0)
        lorakit.dequantize(model)
        lorakit.merge(model)
        torch.testing.assert_close(model(t).logits, want, atol=1e-5, rtol=0)


def _bnb_linear4bit(in_features: int, out_features: int) -> nn.Module:
    """A bitsandbytes NF4 layer (double quantization) with a random N(0, 0.02) weight, quantized on the CPU."""
    layer = bnb.nn.Linear4bit(
        in_features, out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4"
    )
    w = torch.randn(out_features, in_features) * 0.02
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)
    return layer.to("cpu")  # bitsandbytes quantizes when the parameter moves to a device


@needs_bnb
@pytest.mark.parametrize("shape", [(576, 1536), (1536, 576), (576, 192)], ids=["up", "down", "k_proj"])
def test_bitsandbytes_cpu_repacking_is_read_without_changing_the_layer(shape):
    """On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit at its first eval forward without grad:
    the codes are reordered and the absmax constants de-nested and rounded to bf16, and from then on the layer
    computes with those. lorakit must read exactly that weight, codes x bf16 constants, and must not write into
    the layer while reading (bitsandbytes' own inverse re-quantizes the constants, a second rounding, and stores
    it). The repacking is done here as bitsandbytes' forward does it, so this runs on every CPU; SmolLM2's
    shapes (MLP up/down, k_proj with 3 KV heads)."""
    layer = _bnb_linear4bit(*shape)
    qs = layer.weight.quant_state
    assert qs.nested
    codes = layer.weight.data.clone()
    absmax = (
        bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    )  # the fp32 constants, before repacking
    want_std = bnbf.dequantize_4bit(codes, qs)
    bf16_state = bnbf.QuantState(
        absmax=absmax.to(torch.bfloat16).float(),
        shape=qs.shape,
        code=qs.code,
        blocksize=qs.blocksize,
        quant_type=qs.quant_type,
        dtype=torch.float32,
    )
    want = bnbf.dequantize_4bit(codes, bf16_state)  # what the repacked layer computes with
    assert bnb_interop.dequantize_linear4bit(layer).equal(want_std)  # standard layout: exact
    layer.weight.data, _ = bnbf._convert_weight_packed_for_cpu(layer.weight.data, qs)  # bitsandbytes' forward
    assert layer.weight.quant_state.packing_format_for_cpu
    held = (layer.weight.data.clone(), qs.absmax.clone())
    got = bnb_interop.dequantize_linear4bit(layer)
    assert got.equal(want) and bnb_interop.dequantize_linear4bit(layer).equal(want)
    assert layer.weight.quant_state.packing_format_for_cpu
    assert layer.weight.data.equal(held[0]) and layer.weight.quant_state.absmax.equal(held[1])
    assert bnb_interop.settings(layer) == {
        "method": "bitsandbytes-nf4",
        "block_size": 64,
        "double_quant": True,
    }
    assert bnb_interop.weight_dtype(layer) == torch.float32
    # bits per weight as held now: 4-bit codes + one bf16 constant per 64 weights
    assert bnb_interop.storage_bytes(layer) * 8 / want.numel() == pytest.approx(4 + 16 / 64)


@needs_bnb
@pytest.mark.skipif(
    not (bnb is not None and bnbf.has_avx512bf16()), reason="bitsandbytes repacks only on AVX512-BF16 CPUs"
)
def test_lora_on_a_repacked_bitsandbytes_layer_in_eval():
    """The real repacking path, on an AVX512-BF16 CPU: a LoRA layer over a Linear4bit in eval without grad. Its
    output is bitsandbytes' bf16 kernel plus s·B·A·x; the kernel rounds x and the products to bf16, so the
    tolerance is relative, 2^-7 of the output's scale (bf16 keeps 8 significant bits); repeated forwards and
    reads are identical (nothing drifts), and merging in lorakit.dequantize uses the weight read here."""
    model = nn.Sequential(_bnb_linear4bit(576, 1536)).eval()
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=["0"]))
    randomize(model)
    layer = model[0]
    x = torch.randn(3, 576)
    with torch.no_grad():
        y1 = layer(x)
        assert layer.base_layer.weight.quant_state.packing_format_for_cpu  # bitsandbytes did repack it
        w = bnb_interop.dequantize_linear4bit(layer.base_layer)
        ad = layer.adapters["default"]
        want = F.linear(x, w) + 2.0 * (x @ ad.lora_A.T @ ad.lora_B.T)
        torch.testing.assert_close(y1, want, atol=want.abs().max().item() * 2**-7, rtol=0)
        assert layer(x).equal(y1) and bnb_interop.dequantize_linear4bit(layer.base_layer).equal(w)
        lorakit.dequantize(model)
        torch.testing.assert_close(model[0].base_layer.weight, w, atol=0, rtol=0)


@needs_bnb
@pytest.mark.parametrize("in_features", [64, 576, 1536])
def test_bitsandbytes_dequantize_is_the_nf4_table_by_hand(in_features):
    """lorakit reads bitsandbytes' weights through its CPU `dequantize_4bit`: it equals the NF4 table applied by
    hand (codes times the block's absmax) when the input features fill whole blocks of 64, as in real models.
    (On this AVX-512 machine, 0.50.2 gave wrong values for 32 input features, a layer smaller than one block;
    hence the 64-feature tiny model above.)"""
    w = torch.randn(64, in_features) * 0.02
    q, qs = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    codes = q.view(-1)
    idx = torch.stack([(codes >> 4).long(), (codes & 0xF).long()], 1).view(-1)
    by_hand = (qs.code[idx].view(-1, 64) * qs.absmax.view(-1, 1)).view(w.shape)
    assert bnbf.dequantize_4bit(q, qs).equal(by_hand)


@needs_bnb
def test_bitsandbytes_8bit_layers_are_refused():
    model = nn.Sequential(bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False))
    with pytest.raises(lorakit.TargetError, match="8-bit layers are not supported"):
        lorakit.inject(model, LoraConfig(r=2, targets=["0"]))


@needs_bnb
@pytest.mark.real_model
def test_lora_on_the_real_model_loaded_with_bitsandbytes(default_model_dir, tmp_path):
    """SmolLM2 loaded through transformers' BitsAndBytesConfig (NF4, double quantization), with a lorakit adapter,
    in eval mode: on an AVX512-BF16 CPU bitsandbytes repacks every layer at the first forward. Reading the
    layers (the quantization report, `lorakit.dequantize`) must not change what the model computes, and the
    dequantized model must compute what the 4-bit one did: same weights, the 4-bit kernel differing only by
    its bf16 arithmetic, which rounds every activation to 8 significant bits over 30 layers. Tolerance: mean
    |difference| below 3% of mean |logit| and top-1 agreement above 85% (measured 0.7-1.2% and 94-100% over
    adapter seeds on an AVX-512 machine; wrong weights give ~100%). Without AVX512-BF16 nothing is repacked,
    and the two agree to fp32 rounding."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, quantization_config=cfg, device_map="cpu")
    model.eval()
    lorakit.inject(model, LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    randomize(model)
    t = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first = model(t).logits
        stats = lorakit.parameter_report(model)["quantization"]
        assert stats["method"] == "bitsandbytes-nf4" and stats["bits_per_param"] < 4.5
        assert model(t).logits.equal(first)  # reading changed nothing
        lorakit.dequantize(model)
        full = model(t).logits
    rel = ((full - first).abs().mean() / full.abs().mean()).item()
    agree = (full.argmax(-1) == first.argmax(-1)).float().mean().item()
    assert rel < 0.03 and agree > 0.85, (rel, agree)
