"""lorakit.attention: CPU flash attention with the bf16 forward and the fp32 backward, used in training forwards.

Tolerances. The forward calls the same kernel as `scaled_dot_product_attention` on the same inputs, so outputs are
compared bitwise. The backward computes in fp32 on upcast inputs and rounds to bf16 at the end, so its error
against a float64 reference is one bf16 rounding (relative 2^-9 = 2e-3 per entry, ~1.7e-3 in norm), and it must
be no larger than the bf16 kernel's own (which also rounds inside). Through a two-layer model in bf16 autocast,
LoRA gradients differ from the float64 model's by bf16 rounding of every activation: asserted within 5e-2 in
norm, and within 1.2× the error of the plain bf16 path.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit.attention import NAME, flash_attention, training_attention, upcast_backward_wins
from lorakit.device import autocast, upcast_trainable
from lorakit.fused import causal_lm_loss

from tiny import SEVEN, randomize, tiny_llama


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


def _graph_names(t: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


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
    return loss.detach(), grads, _graph_names(loss)


@pytest.mark.parametrize("left", [False, True])
def test_training_forward_uses_it_with_the_same_loss_and_exact_gradients(left):
    batch = _batch(left)
    model = _model(torch.bfloat16)
    loss, grads, names = _lora_grads(model, batch, torch.bfloat16)
    assert "_FlashUpcastBackwardBackward" in names
    assert model.config._attn_implementation == "sdpa"  # restored after the forward
    with torch.no_grad(), autocast(torch.device("cpu"), torch.bfloat16):  # no gradients: transformers' sdpa
        assert torch.equal(loss, causal_lm_loss(model, batch))  # the same forward kernel: the same loss, bitwise
    # the plain bf16 path's gradients (the model's own forward), and the float64 model's
    model.zero_grad(set_to_none=True)
    lorakit.set_lean_loss(model, False)  # the model's own forward: transformers' sdpa
    with autocast(torch.device("cpu"), torch.bfloat16):
        plain_loss = model(**batch).loss
    assert "_FlashUpcastBackwardBackward" not in _graph_names(plain_loss)
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


def test_not_used_where_it_does_not_apply():
    batch = _batch(False)
    model = _model(torch.float32)
    *_, names = _lora_grads(model, batch, torch.float32)
    assert "_FlashUpcastBackwardBackward" not in names  # fp32 base
    model = _model(torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss, grads, names = _lora_grads(model, batch, torch.bfloat16)  # recomputation must see the same attention
    assert "_FlashUpcastBackwardBackward" not in names and len(grads) == 28
    model.gradient_checkpointing_disable()
    with torch.no_grad(), training_attention(model):
        assert model.config._attn_implementation == "sdpa"  # no gradients: nothing to change
    model.config._attn_implementation = "eager"
    with training_attention(model):
        assert model.config._attn_implementation == "eager"  # only sdpa is replaced
    model.config._attn_implementation = "sdpa"


def test_checkpointed_training_uses_it_when_the_backward_is_in_the_block():
    """`lorakit train` holds the block over forward and backward, so the recomputed forward matches the first."""
    batch = _batch(True)
    model = _model(torch.bfloat16)
    _, plain_grads, _ = _lora_grads(model, batch, torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.zero_grad(set_to_none=True)
    with training_attention(model, with_backward=True):
        with autocast(torch.device("cpu"), torch.bfloat16):
            loss = causal_lm_loss(model, batch)
        loss.backward()
    assert "_FlashUpcastBackwardBackward" in _graph_names(loss)
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.equal(p.grad, plain_grads[n]), n  # recomputation repeats the same kernels exactly
    assert model.config._attn_implementation == "sdpa"


def test_the_config_is_restored_on_error():
    model = _model(torch.bfloat16)
    with pytest.raises(RuntimeError, match="boom"), training_attention(model):
        assert model.config._attn_implementation == NAME
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_the_library_path_uses_it():
    """`inject` + the model's own forward with labels (the lean loss): the same attention as `lorakit train`."""
    model = _model(torch.bfloat16)
    batch = _batch(True)
    with autocast(torch.device("cpu"), torch.bfloat16):
        out = model(**batch)
    assert "_FlashUpcastBackwardBackward" in _graph_names(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
