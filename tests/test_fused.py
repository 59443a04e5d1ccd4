"""The fused LoRA linear and chunked LM-head loss compute the plain autograd path's values and gradients.

Tolerances: float64 checks use torch.autograd.gradcheck (finite differences, its defaults). float32 comparisons
of fused vs plain use atol 2e-6 / rtol 1e-5: the two paths add the same products in another order (e.g. the
scaling is applied inside addmm instead of on x·Aᵀ), so they differ by float32 rounding, ~1e-7 relative per op,
accumulated over two decoder layers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit import LoraConfig, fused
from lorakit.data.tokenize import IGNORE
from lorakit.dropout import dropout_keep, dropout_scale, splitmix64
from lorakit.fused import _LoraLinear, set_fused
from lorakit.head import causal_lm_loss, fusable_head, lean_head, lm_head_loss
from lorakit.siblings import probe_groups

from tiny import ids, randomize, tiny_gpt2, tiny_llama

ATOL, RTOL = 2e-6, 1e-5


@pytest.fixture(autouse=True)
def _fused_on():
    old, old_groups = fused.set_fused(True), fused.set_groups(True)
    yield
    fused.set_fused(old)
    fused.set_groups(old_groups)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_gradcheck(p, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, 8, dtype=torch.float64, generator=g)
    b = torch.randn(6, dtype=torch.float64, generator=g) if bias else None
    a = torch.randn(4, 8, dtype=torch.float64, generator=g, requires_grad=True)
    bb = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    # with dropout, backward must apply forward's mask (saved as bool); gradcheck fails otherwise
    assert torch.autograd.gradcheck(
        lambda x, a, bb: _LoraLinear.apply(x, w, b, a, bb, 0.7, p, 123), (x, a, bb)
    )


def _splitmix64_reference(seed: int, count: int) -> list[int]:
    """splitmix64 as published (Steele, Lea, Flood 2014), in Python integers: outputs 1..count."""
    m = (1 << 64) - 1
    out = []
    for i in range(1, count + 1):
        z = (seed + i * 0x9E3779B97F4A7C15) & m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        out.append(z ^ (z >> 31))
    return out


def _keep_reference(seed: int, n: int, p: float) -> torch.Tensor:
    """Each 64-bit output gives four 16-bit fields, low first; a field read as a signed int16 plus 32768 (i.e. with
    its top bit flipped) below round(p·65536) drops the entry."""
    fields = [(z >> (16 * j)) & 0xFFFF for z in _splitmix64_reference(seed, (n + 3) // 4) for j in range(4)]
    draws = [f ^ 0x8000 for f in fields]
    return torch.tensor([d >= round(p * 65536) for d in draws[:n]])


@pytest.mark.parametrize("seed", [0, 99, 2**62 - 1])
def test_splitmix64_matches_the_published_algorithm(seed):
    got = splitmix64(seed, 50)
    assert [v & ((1 << 64) - 1) for v in got.tolist()] == _splitmix64_reference(seed, 50)


def test_dropout_keep_rate_and_independence():
    """Over 2**20 draws the kept fraction is 1 - p within 5 standard deviations (sd = sqrt(p(1-p)/n) ≈ 2e-4);
    neighbouring entries are uncorrelated (|r| < 5/sqrt(n) ≈ 0.005); other seeds give other masks."""
    n = 1 << 20
    for p in (0.05, 0.3):
        keep = dropout_keep(7, torch.Size([n]), p)
        sd = (p * (1 - p) / n) ** 0.5
        assert abs(keep.float().mean().item() - (1 - p)) < 5 * sd, p
        assert dropout_scale(p) == pytest.approx(1 / (1 - p), rel=1e-4)
        assert torch.equal(dropout_keep(7, torch.Size([n]), p), keep)  # a function of (seed, shape, p)
        k = keep.float()
        r = torch.corrcoef(torch.stack([k[:-1], k[1:]]))[0, 1].item()
        assert abs(r) < 5 / n**0.5, (p, r)
        other = dropout_keep(8, torch.Size([n]), p)
        assert (other != keep).float().mean() > p  # independent masks differ in about 2p(1-p) of entries


def test_lora_linear_is_the_seed_formula_with_dropout():
    """Forward equals W0·x + b + s·B·A·(x⊙m/(1-p)), with m the mask the published generator gives for the seed."""
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(7, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(6, generator=g)
    a, bb = torch.randn(4, 8, generator=g), torch.randn(6, 4, generator=g)
    p, seed = 0.25, 99
    keep = _keep_reference(seed, 56, p).view(7, 8)
    want = x @ w.T + b + 0.5 * ((x * keep / (1 - p)) @ a.T) @ bb.T
    got = _LoraLinear.apply(x, w, b, a, bb, 0.5, p, seed)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert 0.6 < keep.float().mean() < 0.9  # p=0.25 of 56 entries dropped, loosely


def _loss_and_grads(model, x, *, use_fused: bool, chunked: bool = False):
    fused.set_fused(use_fused)
    model.zero_grad(set_to_none=True)
    batch = {"input_ids": x, "labels": x}
    loss = causal_lm_loss(model, batch, fused=chunked)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_model_gradients_equal_plain(dropout):
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets="all-linear", dropout=dropout))
    randomize(model)
    model.train()
    x = ids()
    torch.manual_seed(5)
    loss_f, grads_f = _loss_and_grads(model, x, use_fused=True)
    if dropout:
        # plain nn.Dropout draws other masks: compare the fused path with itself (determinism) and check the
        # gradients differ from the no-dropout ones, i.e. dropout is really applied.
        torch.manual_seed(5)
        loss_f2, grads_f2 = _loss_and_grads(model, x, use_fused=True)
        assert torch.equal(loss_f, loss_f2)
        model.eval()
        loss_eval, _ = _loss_and_grads(model, x, use_fused=True)
        assert not torch.allclose(loss_eval, loss_f)
        return
    loss_p, grads_p = _loss_and_grads(model, x, use_fused=False)
    torch.testing.assert_close(loss_f, loss_p, atol=ATOL, rtol=RTOL)
    assert grads_f.keys() == grads_p.keys()
    for n in grads_f:
        torch.testing.assert_close(grads_f[n], grads_p[n], atol=ATOL, rtol=RTOL, msg=n)


def test_fused_path_is_taken_and_saves_less_with_dropout():
    """The fused node replaces the plain ops, and it keeps no dropped copy of x for backward."""
    x = torch.randn(64, 32, requires_grad=True)

    def saved_bytes(use_fused: bool) -> int:
        fused.set_fused(use_fused)
        lin = nn.Sequential(nn.Linear(32, 32))
        lorakit.inject(lin, LoraConfig(r=4, targets=["0"], dropout=0.1))
        lin.train()
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = lin(x)
        assert ("LoraLinear" in type(out.grad_fn).__name__) == use_fused
        return sum(seen.values()) - sum(p.numel() * 4 for p in lin.parameters())

    plain, fast = saved_bytes(False), saved_bytes(True)
    assert fast < plain, (fast, plain)


def test_fallbacks_use_the_plain_path():
    x = ids()
    for cfg in (
        LoraConfig(r=4, targets=["q_proj"], use_dora=True),  # a variant
    ):
        model = tiny_llama()
        lorakit.inject(model, cfg)
        out = model.model.layers[0].self_attn.q_proj(torch.randn(2, 3, 32, requires_grad=True))
        assert "LoraLinear" not in type(out.grad_fn).__name__
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, targets=["q_proj"]))
    lorakit.inject(model, LoraConfig(r=4, targets=["q_proj"]), name="second")
    lorakit.set_active(model, ["default", "second"])  # two adapters at once
    q = model.model.layers[0].self_attn.q_proj
    assert "LoraLinear" not in type(q(torch.randn(2, 3, 32, requires_grad=True)).grad_fn).__name__
    lorakit.set_active(model, "default")
    assert "LoraLinear" in type(q(torch.randn(2, 3, 32, requires_grad=True)).grad_fn).__name__
    q.base_layer.register_forward_hook(lambda *a: None)  # a hook on the base layer must still run
    assert "LoraLinear" not in type(q(torch.randn(2, 3, 32, requires_grad=True)).grad_fn).__name__
    model(x)  # still runs


def test_chunked_loss_equals_model_loss_and_gradients():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, targets="all-linear"))
    randomize(model)
    x = ids(batch=3, seq=10)
    labels = x.clone()
    labels[0, :4] = IGNORE  # a prompt that is not learned
    labels[2, 7:] = IGNORE  # padding
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": labels}
    for chunk_fused in (True, False):
        model.zero_grad(set_to_none=True)
        loss = causal_lm_loss(model, batch, fused=chunk_fused)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        if chunk_fused:
            ref_loss, ref_grads = loss.detach(), grads
    torch.testing.assert_close(ref_loss, loss.detach(), atol=ATOL, rtol=RTOL)
    for n in grads:
        torch.testing.assert_close(ref_grads[n], grads[n], atol=ATOL, rtol=RTOL, msg=n)


def test_lm_head_loss_chunks_and_edge_cases():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 9, 8, generator=g, requires_grad=True)
    w = torch.randn(50, 8, generator=g)
    y = torch.randint(0, 50, (2, 9), generator=g)
    ref = F.cross_entropy((h @ w.T)[:, :-1].reshape(-1, 50), y[:, 1:].reshape(-1))
    for chunk in (1, 3, 16, 1000):
        torch.testing.assert_close(lm_head_loss(h, w, y, chunk=chunk), ref, atol=ATOL, rtol=RTOL)
    none = lm_head_loss(h, w, torch.full_like(y, IGNORE))
    none.backward()  # nothing to learn: zero loss, zero gradient, no error
    assert none.item() == 0.0 and h.grad.abs().max() == 0
    hb = h.detach().bfloat16().requires_grad_(True)
    lb = lm_head_loss(hb, w.bfloat16(), y)
    assert lb.dtype == torch.float32  # bf16 logits are upcast, as the HF loss does
    torch.testing.assert_close(lb, ref.detach(), atol=0.05, rtol=0.02)  # bf16 inputs: ~3 significant digits


def test_chunked_loss_falls_back_when_it_would_differ():
    x = ids()
    batch = {"input_ids": x, "labels": x}
    gpt2 = tiny_gpt2()  # Conv1D blocks, tied nn.Linear head: the chunked loss applies and equals HF's
    torch.testing.assert_close(causal_lm_loss(gpt2, batch), gpt2(**batch).loss, atol=ATOL, rtol=RTOL)
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, targets=["lm_head"]))  # one plain LoRA on the head: chunked with it
    randomize(model)
    assert lean_head(model)[1] is not None
    torch.testing.assert_close(causal_lm_loss(model, batch), model(**batch).loss, atol=ATOL, rtol=RTOL)
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, targets=["lm_head"], use_dora=True))  # DoRA: no longer plain
    randomize(model)
    assert lean_head(model) is None
    torch.testing.assert_close(causal_lm_loss(model, batch), model(**batch).loss, atol=0, rtol=0)
    capped = tiny_llama()
    capped.config.final_logit_softcapping = 30.0
    assert fusable_head(capped) is None
    import peft

    from tiny import peft_config

    wrapped = peft.get_peft_model(tiny_llama(), peft_config(LoraConfig(r=4, targets=["q_proj"])))
    assert fusable_head(wrapped) is None  # PEFT's wrapper: its own forward runs
    torch.testing.assert_close(causal_lm_loss(wrapped, batch), wrapped(**batch).loss, atol=0, rtol=0)


@pytest.mark.real_model
def test_real_model_fused_step_equals_plain(default_model_dir):
    """One training step's gradients on SmolLM2-135M (30 layers, tied head): fused + chunked vs plain autograd.
    Tolerance 1e-5 absolute on gradients of magnitude up to ~1: float32 rounding through 30 layers."""
    model, _ = lorakit.load_model(str(default_model_dir))
    lorakit.inject(model, LoraConfig(r=8, alpha=16, targets="all-linear"))
    randomize(model, std=0.02)
    model.train()
    x = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": x, "labels": x}
    results = []
    for on in (True, False):
        fused.set_fused(on)
        model.zero_grad(set_to_none=True)
        loss = causal_lm_loss(model, batch, fused=on)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (lf, gf), (lp, gp) = results
    torch.testing.assert_close(lf, lp, atol=1e-5, rtol=1e-5)
    for a, b in zip(gf, gp, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_sibling_groups_share_one_product_and_keep_gradients():
    """After probing, q/k/v (and gate/up) compute x·Aᵀ once, stacked; o_proj, under the same parent with the same
    input width but another input, stays out. Loss and gradients equal the plain path's (ATOL/RTOL above)."""
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets="all-linear", rank_pattern={"k_proj": 2}))
    randomize(model)
    model.train()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    h = torch.randn(2, 3, 32, requires_grad=True)
    attn.q_proj(h)
    assert "LoraFromXA" not in type(attn.k_proj(h).grad_fn).__name__  # not probed yet: inactive
    assert probe_groups(model, ids()) == 4  # 2 layers x (q/k/v, gate/up)
    assert attn.q_proj.group.members == [attn.q_proj, attn.k_proj, attn.v_proj]
    assert mlp.gate_proj.group.members == [mlp.gate_proj, mlp.up_proj] and mlp.down_proj.group is None
    x = ids()
    loss_f, grads_f = _loss_and_grads(model, x, use_fused=True)
    q, k = attn.q_proj(h), attn.k_proj(h)
    assert "LoraFromXA" in type(k.grad_fn).__name__ and "LoraFromXA" in type(q.grad_fn).__name__
    k.sum().backward()  # a member's output alone still carries its gradient through the stacked product
    assert attn.k_proj.adapters["default"].lora_A.grad is not None
    loss_p, grads_p = _loss_and_grads(model, x, use_fused=False)
    torch.testing.assert_close(loss_f, loss_p, atol=ATOL, rtol=RTOL)
    for n in grads_f:
        torch.testing.assert_close(grads_f[n], grads_p[n], atol=ATOL, rtol=RTOL, msg=n)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_bf16_autocast_runs_forward_and_backward(dropout):
    """Under `torch.autocast("cpu", bfloat16)` (what transformers' Trainer does with bf16=True) an injected model
    trains, on the fused path with every operand cast to bf16, as autocast would. Loss and adapter gradients match
    fp32 within bf16 precision (8 significant bits, so 2^-5 relative after a two-layer model's rounding), and B's
    gradients exist for every adapted layer."""
    torch.manual_seed(0)
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets="all-linear", dropout=dropout))
    randomize(model)
    model.train(dropout == 0.0)  # with dropout: eval, so that both runs compute the same function
    t = ids()
    ref = model(t, labels=t).loss
    ref.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(t, labels=t).loss
    loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and any("lora_B" in n for n in got)
    torch.testing.assert_close(loss.float(), ref, rtol=2**-5, atol=0)
    for n in want:
        scale = want[n].abs().max().item()
        torch.testing.assert_close(got[n].float(), want[n], atol=scale * 2**-4, rtol=0, msg=n)


def _fused_and_plain(model, t, ctx):
    """(loss, grads) of the same step on the fused path and on plain autograd, in context `ctx`."""
    runs = []
    for use in (True, False):
        old = set_fused(use)
        try:
            model.zero_grad(set_to_none=True)
            with ctx():
                loss = model(t, labels=t).loss
            loss.backward()
            runs.append((loss.float(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        finally:
            set_fused(old)
    return runs


@pytest.mark.parametrize("where", ["autocast", "bf16-base"])
def test_mixed_precision_takes_the_fused_path_and_matches_plain(where):
    """Under autocast, and on a bf16 base with fp32 adapters (`--model.dtype bfloat16`), the layers are fused (one
    autograd node) and the adapters' gradients come back in fp32. Against plain autograd in the same setting the
    loss agrees within bf16 rounding (2^-6 relative) and gradients within 2^-4 of their largest entry: the plain
    path of a bf16 base multiplies the adapters in fp32, the fused one in bf16, as autocast does."""
    import contextlib

    torch.manual_seed(0)
    model = tiny_llama()
    if where == "bf16-base":
        model = model.to(torch.bfloat16)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets="all-linear"))
    for p in lorakit.adapter_parameters(model):
        p.data = p.data.float()
    randomize(model)
    model.train()
    t = ids()
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if where == "autocast" else contextlib.nullcontext
    h = model.model.embed_tokens(t).to(torch.bfloat16)
    with ctx():
        assert "LoraLinear" in type(model.model.layers[0].self_attn.q_proj(h).grad_fn).__name__
    (lf, gf), (lp, gp) = _fused_and_plain(model, t, ctx)
    assert gf.keys() == gp.keys() and gf and all(g.dtype == torch.float32 for g in gf.values())
    torch.testing.assert_close(lf, lp, rtol=2**-6, atol=0)
    for n in gf:
        torch.testing.assert_close(gf[n], gp[n], atol=gp[n].abs().max().item() * 2**-4, rtol=0, msg=n)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_4bit_base_trains_through_the_fused_layer_and_matches_plain(dropout):
    """On a 4-bit NF4 base, training takes the fused layer with the weight dequantized for each use (forward and
    again backward), and gives the plain path's loss and gradients (the same tolerance as above: the same
    products in another order). Inference keeps the base's own forward (its matrix-vector product straight from
    the codes for a few rows), so outputs under no_grad are the plain path's bit for bit."""
    model = tiny_llama()
    lorakit.quantize(model)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets="all-linear", dropout=dropout))
    randomize(model)
    model.train()
    q = model.model.layers[1].self_attn.q_proj
    h = torch.randn(2, 3, 32, requires_grad=True)
    assert "LoraLinear" in type(q(h).grad_fn).__name__
    x = ids()
    torch.manual_seed(5)
    loss_f, grads_f = _loss_and_grads(model, x, use_fused=True)
    if dropout:  # plain nn.Dropout draws other masks: the fused path is deterministic and does drop
        torch.manual_seed(5)
        assert torch.equal(loss_f, _loss_and_grads(model, x, use_fused=True)[0])
        model.eval()
        assert not torch.allclose(_loss_and_grads(model, x, use_fused=True)[0], loss_f)
        return
    loss_p, grads_p = _loss_and_grads(model, x, use_fused=False)
    torch.testing.assert_close(loss_f, loss_p, atol=ATOL, rtol=RTOL)
    assert grads_f.keys() == grads_p.keys() and grads_f
    for n in grads_f:
        torch.testing.assert_close(grads_f[n], grads_p[n], atol=ATOL, rtol=RTOL, msg=n)
    model.eval()
    with torch.no_grad():
        fused.set_fused(True)
        y_f = q(h)
        fused.set_fused(False)
        assert torch.equal(y_f, q(h))


def test_the_fused_layer_on_a_4bit_base_keeps_no_dense_weight():
    """What the fused node saves for backward: x, the rank-r product and the adapters, never a dense copy of the
    4-bit weight (it is dequantized again in backward)."""
    model = nn.Sequential(nn.Linear(64, 96, bias=True))
    lorakit.quantize(model)
    lorakit.inject(model, LoraConfig(r=4, targets=["0"]))
    model.train()
    x = torch.randn(5, 64, requires_grad=True)
    shapes: list[tuple[int, ...]] = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    assert "LoraLinear" in type(out.grad_fn).__name__
    assert (96, 64) not in shapes and (64, 96) not in shapes, shapes
    out.sum().backward()
    assert x.grad is not None and model[0].adapters["default"].lora_A.grad is not None
