"""LoRA layer numerics: zero init equals base, the seed's formula, merge/unmerge exactness, every layer type."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig

from tiny import ConvNet, ids, randomize, tiny_gpt2, tiny_llama

# fp32 merge/unmerge: W + ΔW - ΔW differs from W by rounding only, ~1 ulp of |W| (~0.1) => 1e-6 is generous.
MERGE_ATOL = 1e-6
# logits after merge vs unmerged forward: accumulated rounding over 2 layers of matmuls.
LOGIT_ATOL = 1e-5


def _conv_input():
    return torch.randint(0, 20, (3, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("init", ["default", "gaussian", "pissa", "olora", "orthogonal"])
def test_init_equals_base(init):
    model, x = tiny_llama(), ids()
    base = model(x).logits
    lorakit.inject(model, LoraConfig(r=4, targets="all-linear", init=init))
    # PiSSA and OLoRA move a part of W0 into B·A, and orthogonal's B·A is 0 as a product of orthogonal rows:
    # equal up to rounding (logits of order 1 in f32)
    atol = 1e-5 if init in ("pissa", "olora", "orthogonal") else 0.0
    torch.testing.assert_close(model(x).logits, base, atol=atol, rtol=0)


def test_forward_is_the_seed_formula():
    """h = W0·x + (α/r)·B·A·x, computed independently from the stored tensors."""
    lin = nn.Linear(16, 8)
    model = nn.Sequential(lin)
    lorakit.inject(model, LoraConfig(r=3, alpha=6, targets=["0"]))
    randomize(model, std=0.5)
    layer = model[0]
    a, b = layer.adapters["default"].lora_A, layer.adapters["default"].lora_B
    x = torch.randn(5, 16)
    expected = x @ lin.weight.T + lin.bias + (6 / 3) * (x @ a.T @ b.T)
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)
    assert a.shape == (3, 16) and b.shape == (8, 3)


def test_rslora_scaling():
    model = nn.Sequential(nn.Linear(8, 8))
    lorakit.inject(model, LoraConfig(r=16, alpha=8, targets=["0"], use_rslora=True))
    assert model[0].adapters["default"].scaling == pytest.approx(8 / math.sqrt(16))


@pytest.mark.parametrize(
    "make,cfg",
    [
        pytest.param(tiny_llama, LoraConfig(r=4, targets="all-linear"), id="llama-linear"),
        pytest.param(tiny_llama, LoraConfig(r=4, targets=["embed_tokens", "q_proj"]), id="llama-embedding"),
        pytest.param(tiny_llama, LoraConfig(r=4, targets="all-linear", use_dora=True), id="llama-dora"),
        pytest.param(tiny_gpt2, LoraConfig(r=4, targets=["c_attn", "c_proj", "c_fc"]), id="gpt2-conv1d"),
        pytest.param(
            tiny_gpt2, LoraConfig(r=4, targets=["c_attn", "wte"], use_dora=True), id="gpt2-conv1d-dora"
        ),
    ],
)
def test_merge_unmerge_roundtrip(make, cfg):
    model, x = make(), ids()
    lorakit.inject(model, cfg)
    randomize(model, std=0.2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    out = model(x).logits
    lorakit.merge(model)
    lorakit.merge(model)  # idempotent
    merged = model(x).logits
    torch.testing.assert_close(merged, out, atol=LOGIT_ATOL, rtol=0)
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed, "merging must change the base weights"
    lorakit.unmerge(model)
    lorakit.unmerge(model)  # idempotent
    for n, p in model.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], atol=MERGE_ATOL, rtol=0)
    torch.testing.assert_close(model(x).logits, out, atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_conv_and_embedding_layers(use_dora):
    model, x = ConvNet(), _conv_input()
    base = model(x)
    lorakit.inject(
        model, LoraConfig(r=2, alpha=4, targets=["emb", "conv1", "conv2", "head"], use_dora=use_dora)
    )
    torch.testing.assert_close(model(x), base, atol=1e-6, rtol=0)
    randomize(model, std=0.3)
    out = model(x)
    assert (out - base).abs().max() > 1e-3
    lorakit.merge(model)
    torch.testing.assert_close(model(x), out, atol=1e-5, rtol=0)
    lorakit.unmerge(model)
    plain = lorakit.unload(model, merge=True)
    assert not any(isinstance(m, lorakit.LoraLayer) for m in plain.modules())
    torch.testing.assert_close(plain(x), out, atol=1e-5, rtol=0)


def test_delta_weight_matches_merge_for_conv():
    model = ConvNet()
    lorakit.inject(model, LoraConfig(r=2, targets=["conv2"]))
    randomize(model, std=0.3)
    layer = model.conv2
    w0 = layer.base_layer.weight.detach().clone()
    a, b = layer.adapters["default"].lora_A, layer.adapters["default"].lora_B
    expected = torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a) * layer.adapters["default"].scaling
    torch.testing.assert_close(lorakit.delta_weight(layer, layer.adapters["default"]), expected)
    lorakit.merge(model)
    torch.testing.assert_close(layer.base_layer.weight, w0 + expected, atol=1e-6, rtol=0)


def test_only_adapters_get_gradients():
    model, x = tiny_llama(), ids()
    lorakit.inject(model, LoraConfig(r=4, targets="all-linear"))
    randomize(model)
    model(x).logits.sum().backward()
    for n, p in model.named_parameters():
        if "adapters." in n:
            assert p.requires_grad and p.grad is not None, n
        else:
            assert not p.requires_grad and p.grad is None, n


@pytest.mark.parametrize("bias,expect", [("none", 0), ("lora_only", 4), ("all", 4)])
def test_bias_modes(bias, expect):
    model = (
        tiny_gpt2()
    )  # GPT-2's Conv1D layers have biases; c_attn is in 2 layers, c_proj in 2 (+ mlp c_proj 2)
    lorakit.inject(model, LoraConfig(r=2, targets=["c_attn", "c_fc"], bias=bias))
    trainable_biases = [n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    if bias == "all":
        assert len(trainable_biases) > expect  # every bias, layer norms included
    else:
        assert len(trainable_biases) == expect


def test_dora_magnitude_initialised_to_row_norms():
    lin = nn.Linear(10, 6)
    model = nn.Sequential(lin)
    w0 = lin.weight.detach().clone()
    lorakit.inject(model, LoraConfig(r=2, targets=["0"], use_dora=True))
    m = model[0].adapters["default"].magnitude
    torch.testing.assert_close(m, w0.norm(dim=1))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_restore_the_base_on_delete(init):
    model = tiny_llama()
    w0 = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    lorakit.inject(model, LoraConfig(r=4, targets=["q_proj"], init=init))
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.base_layer.weight, w0)
    lorakit.delete_adapter(model, "default")
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight, w0, atol=1e-6, rtol=0)


def test_input_dtype_is_preserved():
    model = nn.Sequential(nn.Linear(8, 8).to(torch.bfloat16))
    lorakit.inject(model, LoraConfig(r=2, targets=["0"]))
    assert model[0].adapters["default"].lora_A.dtype == torch.bfloat16
    assert model(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("merge", [True, False])
def test_unload_with_inactive_pissa_adapter_restores_base(merge):
    model, x = tiny_llama(), ids()
    base = model(x).logits
    lorakit.inject(model, LoraConfig(r=4, targets=["q_proj"], init="pissa"), "p")
    lorakit.inject(model, LoraConfig(r=4, targets=["v_proj"]), "plain")  # now "plain" is the only active one
    plain = lorakit.unload(model, merge=merge)
    torch.testing.assert_close(plain(x).logits, base, atol=1e-5, rtol=0)
