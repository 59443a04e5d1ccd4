"""QLoRA: NF4 with double quantization (lorakit.quant), checked against the paper's construction and against
bitsandbytes bit for bit; storage; no gradient reaches the base; LoRA on our NF4Linear and on bitsandbytes'
Linear4bit; the bad inputs. Adapters, merges and models on a 4-bit base are in test_quant_files.py.

bitsandbytes comparisons run against bitsandbytes' CPU kernels (0.50: 4-bit quantization by midpoints,
8-bit quantization of the absmax constants through a 65,536-point lookup grid); they are skipped only when
bitsandbytes cannot be imported (it is in the `test` extra).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
import lorakit.models
from lorakit import LoraConfig, QuantizationError
from lorakit.quant import nf4
from lorakit.quant.nf4 import NF4_CODE, NF4Linear

from tiny import ids, linear_of, nf4_weights, randomize, tiny_llama

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
except Exception as e:  # noqa: BLE001 - any import failure means: no reference to compare with
    bnb = bnbf = None
    BNB_MISSING = f"bitsandbytes cannot be imported ({type(e).__name__}: {e}); pip install -e .[test]"
else:
    BNB_MISSING = ""
needs_bnb = pytest.mark.skipif(bnb is None, reason=BNB_MISSING or "bitsandbytes present")

# The 16 levels come from float32 quantile points (bitsandbytes: torch.linspace in float32, then scipy's ppf);
# our float64 construction differs by their rounding: ~3e-8 in p, times dppf/dp ≈ 14 at the outer point,
# over the normalisation 1.85 => ~2e-7. 1e-6 states that bound with margin.
CODEBOOK_ATOL = 1e-6
# NF4 vs fp32 forward of one layer: the same products summed in another order (dequantized weight in both).
LAYER_ATOL = 1e-5


def _normal_ppf(p: torch.Tensor) -> torch.Tensor:
    return math.sqrt(2.0) * torch.erfinv(2 * p - 1)


def test_codebook_is_the_papers_normal_quantiles():
    """QLoRA §3: 8 positive levels from quantiles of N(0, 1) between 0.5 and offset 0.9677083, 7 negative ones
    mirrored (one fewer, so that 0 is exact), normalised by the largest: 16 levels in [-1, 1]."""
    offset = 0.9677083
    pos = _normal_ppf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -_normal_ppf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    levels = levels / levels.max()
    ours = torch.tensor(NF4_CODE, dtype=torch.float64)
    torch.testing.assert_close(ours, levels, atol=CODEBOOK_ATOL, rtol=0)
    assert ours[0] == -1 and ours[-1] == 1 and ours[7] == 0
    assert (ours < 0).sum() == 7 and (ours > 0).sum() == 8
    assert torch.all(ours[1:] > ours[:-1])


@needs_bnb
def test_dynamic_map_is_bitsandbytes():
    assert torch.equal(nf4.dynamic_map(), bnbf.create_dynamic_map(signed=True))
    assert torch.equal(torch.tensor(NF4_CODE), bnbf.get_4bit_type("nf4", device="cpu"))


@needs_bnb
@pytest.mark.parametrize(
    "shape,dtype",
    [
        pytest.param((576, 576), torch.float32, id="576x576-fp32"),
        pytest.param((1536, 576), torch.bfloat16, id="1536x576-bf16"),
        pytest.param((96, 64), torch.float16, id="96x64-fp16-one-partial-nested-block"),
        pytest.param((256, 320), torch.float32, id="256x320-fp32"),
    ],
)
def test_codes_and_dequantized_weights_equal_bitsandbytes(shape, dtype):
    w = nf4_weights(shape, dtype)
    packed, absmax = nf4.quantize_4bit(w)
    # double quantization off
    b_packed, st = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=False)
    assert torch.equal(packed, b_packed.view(-1)), "packed codes (two per byte, first in the high nibble)"
    assert torch.equal(absmax, st.absmax)
    assert torch.equal(nf4.dequantize_4bit(packed, absmax, shape, dtype), bnbf.dequantize_4bit(b_packed, st))
    # double quantization on: 8-bit absmax codes, their per-256 scales, the subtracted mean
    layer = NF4Linear.from_linear(linear_of(w), double_quant=True)
    b_packed, st = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
    assert torch.equal(layer.qweight, b_packed.view(-1))
    assert torch.equal(layer.absmax, st.absmax), "8-bit absmax codes"
    assert torch.equal(layer.absmax_scale, st.state2.absmax), "absmax of each block of 256 absmax constants"
    assert torch.equal(layer.absmax_offset, st.offset), "mean subtracted before the 8-bit quantization"
    assert st.state2.blocksize == nf4.NESTED_BLOCK_SIZE and torch.equal(st.state2.code, nf4.dynamic_map())
    assert torch.equal(layer.dequantize(), bnbf.dequantize_4bit(b_packed, st))


@needs_bnb
def test_8bit_absmax_quantizer_equals_bitsandbytes_on_many_values():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300_000, generator=g) * torch.rand(300_000, generator=g).pow(4)  # many scales
    x[:256] = 0  # an all-zero block
    codes, absmax = nf4.quantize_8bit(x)
    b_codes, st = bnbf.quantize_blockwise(x, blocksize=256)
    assert torch.equal(codes, b_codes) and torch.equal(absmax, st.absmax)
    assert torch.equal(nf4.dequantize_8bit(codes, absmax), bnbf.dequantize_blockwise(b_codes, st))


def test_error_lower_than_int4_absmax_at_the_same_block_size():
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(2))
    blocks = w.view(-1, 64)
    scale = blocks.abs().amax(1, keepdim=True) / 7  # int4 absmax: 15 symmetric levels
    int4 = ((blocks / scale).round().clamp(-7, 7) * scale).view_as(w)
    plain = NF4Linear.from_linear(linear_of(w), double_quant=False).dequantize()
    double = NF4Linear.from_linear(linear_of(w), double_quant=True).dequantize()
    mse_int4, mse_nf4, mse_dq = (
        ((int4 - w) ** 2).mean(),
        ((plain - w) ** 2).mean(),
        ((double - w) ** 2).mean(),
    )
    assert mse_nf4 < 0.85 * mse_int4, (mse_nf4, mse_int4)  # measured: NF4 ≈ 0.73× int4's MSE
    assert mse_dq < 1.01 * mse_nf4  # 8-bit scales cost almost nothing


@pytest.mark.parametrize("double_quant,bound", [(True, 4.13), (False, 4.5)])
def test_storage_bits_per_parameter(double_quant, bound):
    layer = NF4Linear.from_linear(nn.Linear(576, 1536), double_quant=double_quant)
    buffers = dict(layer.named_buffers())
    nbytes = sum(b.numel() * b.element_size() for b in buffers.values())
    assert nbytes == layer.storage_bytes()
    bits = 8 * nbytes / (576 * 1536)
    assert bits <= bound, bits
    expected = 4 + 8 / 64 + 32 / (64 * 256) if double_quant else 4.5
    assert bits == pytest.approx(expected, abs=2e-3)
    # no full-precision copy of the weight: the only parameter is the bias
    assert [n for n, _ in layer.named_parameters()] == ["bias"]
    assert all(b.dtype == torch.uint8 or b.numel() * 64 <= 576 * 1536 for b in buffers.values())


def test_forward_is_linear_with_the_dequantized_weight_in_the_input_dtype():
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    layer = NF4Linear.from_linear(lin)
    x = torch.randn(3, 5, 128)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize(), lin.bias), atol=LAYER_ATOL, rtol=0)
    xb = x.bfloat16()
    yb = layer(xb)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb, F.linear(xb, layer.dequantize(torch.bfloat16), lin.bias.bfloat16()))


def test_backward_reaches_the_input_only_and_saves_no_weight():
    torch.manual_seed(0)
    lin = nn.Linear(128, 256, bias=False)
    layer = NF4Linear.from_linear(lin)
    x = torch.randn(4, 128, requires_grad=True)
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = layer(x)
    assert all(s.numel() < 128 * 256 for s in saved), f"a weight-sized tensor was saved for backward: {saved}"
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ layer.dequantize(), atol=LAYER_ATOL, rtol=0)
    assert not any(p.requires_grad for p in layer.parameters())


def test_bfloat16_model_and_dtype_casts_keep_the_fp32_block_constants():
    model = tiny_llama()
    lorakit.quantize(model)
    layer = model.model.layers[0].mlp.down_proj
    want = layer.dequantize(torch.bfloat16)
    model.to(torch.bfloat16)
    assert layer.absmax_scale.dtype == layer.absmax_offset.dtype == torch.float32
    assert layer.weight_dtype == torch.bfloat16 and torch.equal(layer.dequantize(), want)
    lorakit.inject(model, LoraConfig(r=4, targets="all-linear"))
    assert next(lorakit.adapter_parameters(model)).dtype == torch.bfloat16
    x = ids()
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert all(p.grad is not None for p in lorakit.adapter_parameters(model))


def _step(model, x, opt):
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def test_qlora_training_leaves_the_4bit_base_bit_identical():
    model = tiny_llama()
    report = lorakit.quantize(model)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets="all-linear"))
    before = {n: b.clone() for n, b in model.named_buffers() if "absmax" in n or "qweight" in n}
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    params = list(lorakit.adapter_parameters(model))
    assert all(p.requires_grad for p in params) and len(before) == 4 * len(report.quantized)
    opt = torch.optim.AdamW(params, lr=1e-2)
    x = ids(batch=4, seq=16)
    losses = [_step(model, x, opt) for _ in range(5)]
    assert losses[-1] < losses[0]
    for n, b in model.named_buffers():
        if n in before:
            assert torch.equal(b, before[n]), n
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters() if "lora_B" in n)


def test_quantize_report_and_what_stays_full_precision(caplog):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(64, 128)
            self.odd = nn.Linear(10, 7)  # 70 weights: not a multiple of 64
            self.lm_head = nn.Linear(128, 32)

    net = Net()
    with caplog.at_level(logging.WARNING, logger="lorakit.quant"):
        report = lorakit.quantize(net)
    assert report.quantized == ["up"]
    assert set(report.skipped) == {"odd", "lm_head"}
    assert "not a multiple of the block size 64" in report.skipped["odd"]
    assert "left unquantized" in report.skipped["odd"]
    assert "odd" in caplog.text and "lm_head" not in caplog.text  # the skip list is asked for: no warning
    assert type(net.odd) is nn.Linear and type(net.lm_head) is nn.Linear and isinstance(net.up, NF4Linear)
    assert report.params == 64 * 128 and report.bytes_before == 64 * 128 * 4
    assert report.bytes_after == net.up.storage_bytes() and "bits/param" in report.summary()


def test_tied_weights_stay_full_precision():
    model = tiny_llama()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as in SmolLM2
    report = lorakit.quantize(model, skip=())
    assert "lm_head" in report.skipped and "tied" in report.skipped["lm_head"]


def test_bad_input_is_refused_with_a_clear_message():
    model = tiny_llama()
    with pytest.raises(QuantizationError, match="unknown quantization method 'int3'"):
        lorakit.quantize(model, "int3")
    lorakit.quantize(model)
    with pytest.raises(QuantizationError, match="already quantized"):
        lorakit.quantize(model)
    fp = tiny_llama()
    lorakit.inject(fp, LoraConfig(r=2))
    with pytest.raises(QuantizationError, match="quantize the base first"):
        lorakit.quantize(fp)
    with pytest.raises(lorakit.AdapterError, match="PiSSA"):
        lorakit.inject(model, LoraConfig(r=2, init="pissa"))
    assert lorakit.adapter_names(model) == [] and not any(
        isinstance(m, lorakit.LoraLayer) for m in model.modules()
    )


def test_merge_into_a_4bit_base_is_refused_and_dequantize_then_merge_works():
    model, x = tiny_llama(), ids()
    lorakit.quantize(model)
    lorakit.inject(model, LoraConfig(r=4, targets="all-linear"))
    randomize(model)
    with torch.no_grad():
        want = model(x).logits
    for call in (lorakit.merge, lambda m: lorakit.unload(m, merge=True)):
        with pytest.raises(QuantizationError, match="lorakit merge"):
            call(model)
    assert not any(layer.merged for _, layer in lorakit.lora_layers(model))
    lorakit.dequantize(model)
    assert not any(isinstance(m, NF4Linear) for m in model.modules())
    lorakit.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, want, atol=1e-5, rtol=0)


def test_dora_runs_on_a_4bit_base():
    model, x = tiny_llama(), ids()
    lorakit.quantize(model)
    with torch.no_grad():
        base = model(x).logits
    lorakit.inject(model, LoraConfig(r=4, targets=["q_proj", "v_proj"], use_dora=True))
    with torch.no_grad():  # B = 0 and m = ‖W0‖: equal to the base
        torch.testing.assert_close(model(x).logits, base, atol=1e-5, rtol=0)
