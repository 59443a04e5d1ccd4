"""Exact rewrites of the frozen base's blocks (lorakit.blocks): SwiGLU, RMSNorm and RoPE, each in one autograd node.

Tolerances: float64 gradcheck at torch's defaults. RMSNorm's forward and RoPE (forward and backward) are bitwise
transformers'. RMSNorm's ∂x is one expression instead of autograd's sum of two paths, so through a two-layer
model outputs and gradients agree to float32 rounding (asserted at rtol 1e-5, atol 1e-6 on entries of ~1e-2). In bf16 the reference is float64: the rewrites' error
must stay within 1.1× transformers' own bf16 error.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit import LoraConfig
from lorakit.blocks import KINDS, lean_blocks, rms_norm, rope, set_lean_blocks, silu_mul
from lorakit.memory import enable_checkpointing

from tiny import SEVEN, graph_names, randomize, tiny_gpt2, tiny_llama, tiny_mistral, tiny_qwen2


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


def test_only_known_swiglu_blocks_are_rewritten_and_inference_is_untouched():
    assert set_lean_blocks(tiny_gpt2(), True) == 0  # GELU MLP: left alone
    model = tiny_qwen2()
    assert set_lean_blocks(model, True) == 9
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
    assert lean_blocks(model) == 9
    lorakit.unload(model)
    assert lean_blocks(model) == 0


def test_rms_norm_gradcheck_and_equals_transformers_forward():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.rand(8, dtype=torch.float64, generator=g) + 0.5
    assert torch.autograd.gradcheck(lambda t: rms_norm(t, w, 1e-6), (x,))
    norm = LlamaRMSNorm(8, eps=1e-5)
    norm.weight.data.uniform_(0.5, 1.5, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        n, h = norm.to(dtype), torch.randn(3, 7, 8, generator=g).to(dtype)
        torch.testing.assert_close(rms_norm(h, n.weight, n.variance_epsilon), n(h), rtol=0, atol=0)  # bitwise


def test_rms_norm_and_rope_in_bf16_are_as_exact_as_transformers():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    g = torch.Generator().manual_seed(1)
    x64 = torch.randn(4, 16, 64, dtype=torch.float64, generator=g)
    grad64 = torch.randn(4, 16, 64, dtype=torch.float64, generator=g)
    norm = LlamaRMSNorm(64).double()
    norm.weight.data.uniform_(0.5, 1.5, generator=g)
    norm.weight.requires_grad_(False)

    def grad_of(fn, x):
        x = x.detach().requires_grad_(True)
        fn(x).backward(grad64.to(x.dtype))
        return x.grad.double()

    exact = grad_of(norm, x64)
    w16 = norm.weight.to(torch.bfloat16)
    theirs = grad_of(norm.to(torch.bfloat16), x64.to(torch.bfloat16))
    ours = grad_of(lambda t: rms_norm(t, w16, norm.variance_epsilon), x64.to(torch.bfloat16))
    assert (ours - exact).norm() <= 1.1 * (theirs - exact).norm()

    q64 = torch.randn(2, 4, 16, 8, dtype=torch.float64, generator=g)
    gq64 = torch.randn(2, 4, 16, 8, dtype=torch.float64, generator=g)
    theta = torch.randn(2, 16, 8, dtype=torch.float64, generator=g)
    cos, sin = theta.cos(), theta.sin()

    def rope_grad(fn, dtype):
        q = q64.detach().to(dtype).requires_grad_(True)
        out = fn(q, cos.to(dtype), sin.to(dtype))
        out.backward(gq64.to(dtype))
        return out.double(), q.grad.double()

    ref_out, ref_grad = rope_grad(lambda q, c, s: apply_rotary_pos_emb(q, q, c, s)[0], torch.float64)
    t_out, t_grad = rope_grad(lambda q, c, s: apply_rotary_pos_emb(q, q, c, s)[0], torch.bfloat16)
    o_out, o_grad = rope_grad(lambda q, c, s: rope(q, q.detach(), c, s)[0], torch.bfloat16)
    assert (o_out - ref_out).norm() <= 1.1 * (t_out - ref_out).norm()
    assert (o_grad - ref_grad).norm() <= 1.1 * (t_grad - ref_grad).norm()


def test_rope_gradcheck_and_equals_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 6, 8, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 6, 8, dtype=torch.float64, generator=g, requires_grad=True)
    theta = torch.randn(2, 6, 8, dtype=torch.float64, generator=g)
    cos, sin = theta.cos(), theta.sin()
    assert torch.autograd.gradcheck(lambda a, b: rope(a, b, cos, sin), (q, k))
    # float32 and bf16, q and k as transformers makes them (a transposed view of a projection): bitwise the same,
    # forward and backward (each product is rounded before it is added, as in their expression)
    for dtype in (torch.float32, torch.bfloat16):
        c, s = cos.to(dtype), sin.to(dtype)
        outs, grads = [], []
        for fn in (rope, apply_rotary_pos_emb):
            q32 = (
                torch.randn(2, 6, 4, 8, generator=torch.Generator().manual_seed(3))
                .to(dtype)
                .requires_grad_(True)
            )
            k32 = (
                torch.randn(2, 6, 2, 8, generator=torch.Generator().manual_seed(4))
                .to(dtype)
                .requires_grad_(True)
            )
            q_out, k_out = fn(q32.transpose(1, 2), k32.transpose(1, 2), c, s)
            (q_out * 3 + k_out.sum(1, keepdim=True)).sum().backward()
            outs.append((q_out, k_out))
            grads.append((q32.grad, k32.grad))
        for mine, theirs in zip(outs[0] + grads[0], outs[1] + grads[1], strict=True):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2, tiny_mistral], ids=["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_every_rewrite_trains_as_transformers_does(make, checkpointing):
    model = make()
    lorakit.inject(model, LoraConfig(r=4, targets=SEVEN))
    randomize(model, std=0.1)
    model.train()
    plain = copy.deepcopy(model)
    set_lean_blocks(plain, False)
    # two layers: 2 MLPs, 2 attentions, 5 norms; installed by inject
    assert [lean_blocks(model, k) for k in KINDS] == [2, 5, 2] and lean_blocks(plain) == 0
    if checkpointing:
        for m in (model, plain):
            enable_checkpointing(m)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row

    def grads(m):
        m.zero_grad(set_to_none=True)
        loss = m(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    (la, ga), (lb, gb) = grads(model), grads(plain)
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=0)
    assert ga.keys() == gb.keys() and len(ga) == 2 * 2 * 7
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-6, msg=n)
    h = torch.randn(1, 3, model.config.hidden_size, requires_grad=True)
    for m, present in ((model, True), (plain, False)):
        layer = m.model.layers[0]
        assert ("_RMSNormBackward" in graph_names(layer.input_layernorm(h))) == present
        assert ("_SiluMulBackward" in graph_names(layer.mlp(h))) == present


def test_the_sliding_window_reaches_the_kernel():
    """If the rewrite dropped Mistral's window, the loss would change: compare against a window as long as the row."""
    short, full = tiny_mistral(window=4), tiny_mistral(window=64)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    losses = []
    for m in (short, full):
        set_lean_blocks(m, True)
        m.train()
        losses.append(m(input_ids=ids, labels=ids).loss)
    ref = [type(m).forward(m, input_ids=ids, labels=ids).loss for m in (short, full)]
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref), rtol=1e-6, atol=0)
    assert not torch.isclose(losses[0], losses[1])


def test_kinds_can_be_chosen_and_generation_is_untouched():
    model = tiny_llama()
    assert set_lean_blocks(model, ["rmsnorm"]) == 5 and lean_blocks(model, "swiglu") == 0
    assert set_lean_blocks(model, {"rope", "swiglu"}) == 4 and lean_blocks(model, "rmsnorm") == 0
    assert set_lean_blocks(model, "rope") == 2 and set_lean_blocks(model, {"rope", "swiglu"}) == 4  # one kind
    with pytest.raises(ValueError, match="unknown block rewrite 'gelu'"):
        set_lean_blocks(model, ["gelu"])
    assert lean_blocks(model) == 4  # a bad call changes nothing
    set_lean_blocks(model, True)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(4))
    out = model.generate(ids, max_new_tokens=4, do_sample=False)  # a KV cache: the module's own forward
    set_lean_blocks(model, False)
    torch.testing.assert_close(model.generate(ids, max_new_tokens=4, do_sample=False), out, rtol=0, atol=0)


def test_the_rewrites_survive_transformers_kernelize_on_train_and_eval(tmp_path):
    """from_pretrained turns transformers' hub kernels on; every train()/eval() switch then restores the class
    forward of decorated blocks (RMSNorm) where no kernel is mapped. The rewrite must come back before it runs."""
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    lorakit.inject(model, LoraConfig(r=4, targets=SEVEN))
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(5))
    for _ in range(2):
        model.eval()
        model.train()
        norm = model.model.layers[1].post_attention_layernorm
        model(input_ids=ids, labels=ids).loss.backward()
        assert lean_blocks(model, "rmsnorm") == 5 and "forward" in norm.__dict__
        assert "_RMSNormBackward" in graph_names(norm(torch.randn(1, 2, 32, requires_grad=True)))
    set_lean_blocks(model, False)
    assert not any(m._forward_pre_hooks for m in model.modules())  # and nothing of ours is left behind
    model.eval()
    model.train()
    model(input_ids=ids, labels=ids)
    assert lean_blocks(model) == 0 and "forward" not in norm.__dict__


@pytest.mark.real_model
def test_on_the_default_model_in_float32_the_rewrites_train_as_transformers(default_model_dir):
    """The real SmolLM2 (30 layers) in float32, every rewrite against none: loss and every adapter gradient agree
    to float32 rounding accumulated over 30 layers (rtol 1e-4 of each gradient's largest entry)."""
    model = lorakit.load_model(default_model_dir)[0]
    lorakit.inject(model, LoraConfig(r=8, targets="all-linear"))
    randomize(model, std=0.01)
    model.train()
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(6))
    runs = []
    for kinds in (True, False):
        assert set_lean_blocks(model, kinds) == (30 + 61 + 30 if kinds else 0)
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (la, ga), (lb, gb) = runs
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=0)
    assert ga.keys() == gb.keys() and len(ga) == 2 * 7 * 30
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=0, atol=1e-4 * gb[n].abs().max().item(), msg=n)
