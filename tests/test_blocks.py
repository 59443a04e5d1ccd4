"""Exact rewrites of the frozen base's blocks (lorakit.blocks): the SwiGLU product in one autograd node.

Tolerances: float64 gradcheck at torch's defaults; in float32 the rewrite computes SiLU's derivative with the
same closed form as torch's silu_backward but in a different order of operations, so gradients agree to float32
rounding through a two-layer model (asserted at rtol 1e-5, atol 1e-6 on entries of ~1e-2).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import lorakit
from lorakit import LoraConfig
from lorakit.blocks import lean_blocks, set_lean_blocks, silu_mul

from tiny import SEVEN, graph_names, randomize, tiny_gpt2, tiny_llama, tiny_qwen2


def test_silu_mul_gradcheck_and_equals_the_autograd_expression():
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(3, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    up = torch.randn(3, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(silu_mul, (gate, up))
    out = silu_mul(gate, up)
    torch.testing.assert_close(out, F.silu(gate) * up, rtol=0, atol=0)
    # only one input needs a gradient: the other's is not computed
    frozen = up.detach()
    silu_mul(gate, frozen).sum().backward()
    assert frozen.grad is None and gate.grad is not None


def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_model_with_the_rewrite_trains_as_without():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, targets=SEVEN))
    randomize(model, std=0.1)
    model.train()
    plain = copy.deepcopy(model)
    set_lean_blocks(plain, False)
    assert lean_blocks(model) == 2 and lean_blocks(plain) == 0  # two layers, installed by inject
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    (la, ga), (lb, gb) = _grads(model, ids), _grads(plain, ids)
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=0)
    assert ga.keys() == gb.keys() and any("gate_proj" in n for n in ga)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-6, msg=n)
    assert "_SiluMulBackward" in graph_names(model.model.layers[0].mlp(torch.randn(1, 3, 32)))
    assert "_SiluMulBackward" not in graph_names(plain.model.layers[0].mlp(torch.randn(1, 3, 32)))


def test_only_known_swiglu_blocks_are_rewritten_and_inference_is_untouched():
    assert set_lean_blocks(tiny_gpt2(), True) == 0  # GELU MLP: left alone
    model = tiny_qwen2()
    assert set_lean_blocks(model, True) == 2
    ids = torch.randint(0, 128, (1, 6))
    mlp = model.model.layers[0].mlp
    with torch.no_grad():  # inference: the module's own forward
        h = torch.randn(1, 6, 64)
        torch.testing.assert_close(mlp(h), type(mlp).forward(mlp, h), rtol=0, atol=0)
        model(ids)
    assert set_lean_blocks(model, False) == 0 and "forward" not in mlp.__dict__


def test_opt_out_and_unload_leave_the_blocks_alone():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, targets=SEVEN), lean=False)
    assert lean_blocks(model) == 0
    lorakit.inject(model, LoraConfig(r=4, targets=SEVEN), "b")
    assert lean_blocks(model) == 2
    lorakit.unload(model)
    assert lean_blocks(model) == 0
