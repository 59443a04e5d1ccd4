"""lorakit.attention: CPU flash attention with the bf16 forward and the fp32 backward, used in training forwards.

Tolerances. The forward calls the same kernel as `scaled_dot_product_attention` on the same inputs, so outputs are
compared bitwise. The backward computes in fp32 on upcast inputs and rounds to bf16 at the end, so its error
against a float64 reference is one bf16 rounding (relative 2^-9 = 2e-3 per entry, ~1.7e-3 in norm), and it must
be no larger than the bf16 kernel's own (which also rounds inside). Through a two-layer model in bf16 autocast,
LoRA gradients differ from the float64 model's by bf16 rounding of every activation: asserted within 5e-2 in
norm, and within 1.2× the error of the plain bf16 path.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit.attention import NAME, flash_attention, upcast_backward_wins
from lorakit.device import autocast, upcast_trainable
from lorakit.head import causal_lm_loss
from lorakit.memory import enable_checkpointing

from tiny import SEVEN, graph_names, randomize, tiny_llama


def _qkv(b=3, h=4, t=20, d=16, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, d, generator=g).to(dtype).requires_grad_() for _ in range(3)]


def _padding_mask(b: int, t: int, left: bool) -> torch.Tensor:
    """(b, 1, t, t) bool, causal and with row i padded by i tokens; left padding leaves fully masked rows."""
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    keep = torch.ones(b, t, dtype=torch.bool)
    for i in range(1, b):
        keep[i, slice(0, i) if left else slice(t - i, t)] = False
    return causal[None, None] & keep[:, None, None, :]


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("mask", ["causal", "right", "left"])
def test_forward_is_bitwise_sdpa_and_backward_at_least_as_exact(mask):
    q, k, v = _qkv()
    m = None if mask == "causal" else _padding_mask(3, 20, left=mask == "left")
    causal = m is None
    out = flash_attention(q, k, v, m, causal, None)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal)
    assert torch.equal(out, ref)  # same kernel, same inputs
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    ours = torch.autograd.grad(out, (q, k, v), g)
    plain = torch.autograd.grad(ref, (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    exact = torch.autograd.grad(
        F.scaled_dot_product_attention(q64, k64, v64, attn_mask=m, is_causal=causal), (q64, k64, v64), g.double()
    )
    for a, b, e in zip(ours, plain, exact, strict=True):
        assert a.dtype == torch.bfloat16 and torch.isfinite(a).all()
        assert _rel(a, e) <= 2.5e-3, _rel(a, e)  # one bf16 rounding
        assert _rel(a, e) <= _rel(b, e) + 1e-4


def test_the_fp32_backward_is_chosen_only_where_it_wins():
    bf = torch.zeros(1, 9, 77, 64, dtype=torch.bfloat16)
    assert upcast_backward_wins(bf, bf)  # the main job's rows: 3x faster (bench_attention.py)
    assert not upcast_backward_wins(bf.float(), bf.float())  # fp32: nothing to upcast
    long = torch.zeros(1, 9, 512, 64, dtype=torch.bfloat16)
    assert not upcast_backward_wins(long, long)  # from ~256 tokens the bf16 kernel is as fast or faster


def _model(dtype):
    model = tiny_llama(hidden=64).to(dtype)  # 4 heads of 16, 2 kv heads (grouped-query attention)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets=SEVEN))
    randomize(model)
    upcast_trainable(model)
    return model.train()


def _batch(left: bool):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 128, (3, 24), generator=g)
    mask = torch.ones_like(ids)
    for i in range(1, 3):
        if left:
            mask[i, : 4 * i] = 0
        else:
            mask[i, -4 * i :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _lora_grads(model, batch, dtype):
    model.zero_grad(set_to_none=True)
    with autocast(torch.device("cpu"), dtype):
        loss = causal_lm_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, graph_names(loss)


@pytest.mark.parametrize("left", [False, True])
def test_training_forward_uses_it_with_the_same_loss_and_exact_gradients(left):
    batch = _batch(left)
    model = _model(torch.bfloat16)
    assert model.config._attn_implementation == NAME and lorakit.lean_attention(model) == 1
    loss, grads, names = _lora_grads(model, batch, torch.bfloat16)
    assert "_FlashUpcastBackwardBackward" in names
    with torch.no_grad(), autocast(torch.device("cpu"), torch.bfloat16):  # no gradients: transformers' sdpa
        assert torch.equal(loss, causal_lm_loss(model, batch))  # the same forward kernel: the same loss, bitwise
    # the plain bf16 path's gradients (transformers' sdpa, the model's own loss), and the float64 model's
    model.zero_grad(set_to_none=True)
    lorakit.set_lean_loss(model, False)
    assert lorakit.set_lean_attention(model, False) == 0 and model.config._attn_implementation == "sdpa"
    with autocast(torch.device("cpu"), torch.bfloat16):
        plain_loss = model(**batch).loss
    assert "_FlashUpcastBackwardBackward" not in graph_names(plain_loss)
    plain_loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    exact_model = _model(torch.float64)
    exact_model.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    _, exact, names64 = _lora_grads(exact_model, batch, torch.float64)
    assert "_FlashUpcastBackwardBackward" not in names64  # float64: nothing to upcast
    assert grads.keys() == exact.keys() == plain.keys() and len(grads) == 2 * 7 * 2
    ours_err = sum(_rel(grads[n], exact[n]) for n in grads) / len(grads)
    plain_err = sum(_rel(plain[n], exact[n]) for n in grads) / len(grads)
    assert ours_err <= 5e-2 and ours_err <= 1.2 * plain_err, (ours_err, plain_err)


def test_gradient_checkpointing_recomputes_the_same_attention():
    """The switch lasts while the adapter is injected, so the forward that checkpointing recomputes in backward
    (as TRL's SFTTrainer turns on by default) takes the same kernels: the gradients are bitwise the same."""
    batch = _batch(True)
    model = _model(torch.bfloat16)
    _, plain_grads, _ = _lora_grads(model, batch, torch.bfloat16)
    enable_checkpointing(model)
    _, grads, names = _lora_grads(model, batch, torch.bfloat16)
    assert "_FlashUpcastBackwardBackward" in names and grads.keys() == plain_grads.keys()
    for n, g in grads.items():
        assert torch.equal(g, plain_grads[n]), n


def test_not_used_where_it_does_not_apply():
    batch = _batch(False)
    model = _model(torch.float32)
    *_, names = _lora_grads(model, batch, torch.float32)
    assert "_FlashUpcastBackwardBackward" not in names  # fp32 base
    for lean in (False, None):  # opted out, or never injected (PEFT's models in `lorakit bench`)
        model = tiny_llama(hidden=64).to(torch.bfloat16).train()
        if lean is False:
            lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets=SEVEN), lean=False)
        else:
            model.model.embed_tokens.weight.requires_grad_(True)
        *_, names = _lora_grads(model, batch, torch.bfloat16)
        assert "_FlashUpcastBackwardBackward" not in names and lorakit.lean_attention(model) == 0
        assert model.config._attn_implementation == "sdpa"
    eager = tiny_llama(hidden=64).to(torch.bfloat16)
    eager.config._attn_implementation = "eager"
    lorakit.inject(eager, lorakit.LoraConfig(r=4, alpha=8, targets=SEVEN))
    assert eager.config._attn_implementation == "eager"  # only transformers' sdpa is replaced


def test_where_torch_would_not_pick_the_flash_kernel_transformers_runs_as_is():
    """Under `sdpa_kernel(MATH)` torch's choice is not the flash kernel: lorakit_sdpa hands the call, with the
    grouped-query keys as they came, to transformers' function, which gives the plain model's loss bitwise."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch = _batch(False)
    model = _model(torch.bfloat16)
    with sdpa_kernel([SDPBackend.MATH]):
        loss, grads, names = _lora_grads(model, batch, torch.bfloat16)
        assert "_FlashUpcastBackwardBackward" not in names and len(grads) == 28
        lorakit.set_lean_attention(model, False)
        with torch.no_grad(), autocast(torch.device("cpu"), torch.bfloat16):
            assert torch.equal(loss, causal_lm_loss(model, batch))


def test_the_library_path_uses_it_and_unload_switches_back(tmp_path):
    """`inject` + the model's own forward with labels (the lean loss), or a loop's own call of the backbone (as
    TRL's SFTTrainer makes): the same attention as `lorakit train`. Nothing of it is saved; `unload` and deleting
    the last adapter switch back."""
    import json

    model = _model(torch.bfloat16)
    batch = _batch(True)
    with autocast(torch.device("cpu"), torch.bfloat16):
        out = model(**batch)
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    assert "_FlashUpcastBackwardBackward" in graph_names(out.loss)
    assert "_FlashUpcastBackwardBackward" in graph_names(hidden)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    model.config.save_pretrained(tmp_path)
    assert NAME not in (tmp_path / "config.json").read_text()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"
    twin = copy.deepcopy(model)
    assert lorakit.lean_attention(twin) == 1
    lorakit.unload(model)
    assert lorakit.lean_attention(model) == 0 and model.config._attn_implementation == "sdpa"
    lorakit.delete_adapter(twin, "default")
    assert twin.config._attn_implementation == "sdpa"
