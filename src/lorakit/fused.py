"""Fused training kernels: a LoRA linear layer as one autograd function (the chunked LM head: `lorakit.head`).

Plain autograd runs ``base(x) + s·B(A(dropout(x)))`` as five or six ops, each allocating its output and saving
its inputs; with dropout it also keeps the dropped copy of x for every adapted layer. `lora_linear` does the same
math in one function:

* forward: ``out = x·W0ᵀ + b`` then ``out += s·(x̃·Aᵀ)·Bᵀ`` in place (one output buffer, no separate ΔW output);
* saved for backward: x (a reference: layers that read the same input, e.g. q/k/v, share it), the rank-r
  product x̃·Aᵀ, and, with dropout, the keep mask at one byte an entry (not the dropped copy of x, which PEFT
  keeps at four); the mask comes from a counter-based generator (`dropout_keep`), 4× cheaper than bernoulli_;
* backward, rank first: ``gB = g·B`` (N×r) once, then ``∂x = g·W0 + s·gB·A`` accumulated in one buffer,
  ``∂A = s·gBᵀ·x̃`` and ``∂B = s·gᵀ·(x̃·Aᵀ)``. W0 gets no gradient: it is frozen.

`set_fused(False)` (or LORAKIT_FUSED=0) switches the LoRA layers back to plain autograd.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lorakit.dropout import dropout_keep, dropout_scale, dropped, scratch
from lorakit.envflags import env_flag

_FUSED = env_flag("LORAKIT_FUSED", True)


# Off by default: measured no gain on SmolLM2 at r=16 (lorakit / lorakit-ungrouped 1.015× [0.868–1.077]).
_GROUPS = env_flag("LORAKIT_GROUPS", False)


def set_groups(enabled: bool) -> bool:
    """Turn the shared x·Aᵀ of sibling projections (q/k/v, gate/up) on or off; returns the old value."""
    global _GROUPS
    old, _GROUPS = _GROUPS, bool(enabled)
    return old


def groups_enabled() -> bool:
    return _GROUPS


def set_fused(enabled: bool) -> bool:
    """Turn the fused LoRA path on or off for all layers (off: plain autograd, for debugging); returns the old value."""
    global _FUSED
    old, _FUSED = _FUSED, bool(enabled)
    return old


def fused_enabled() -> bool:
    return _FUSED


# --------------------------------------------------------------------------------------------------------------
# LoRA linear
# --------------------------------------------------------------------------------------------------------------


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling: float, p: float, seed: int, weight_of=None):
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        w = weight if weight_of is None else weight_of(x.dtype)  # a 4-bit base: dense for this use only
        out = torch.addmm(bias, x2, w.t()) if bias is not None else x2 @ w.t()
        keep = None
        if p == 0.0:
            xa = x2 @ A.t()  # (N, r)
        else:
            keep = dropout_keep(seed, x2.shape, p, x2.device)  # saved: 1 byte an entry
            xa = dropped(x2, keep) @ A.t()
            xa.mul_(dropout_scale(p))  # the dropout scale, applied on the rank side
        out.addmm_(xa, B.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, A, B, xa, keep)
        ctx.scaling, ctx.p, ctx.weight_of = scaling, p, weight_of
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, A, B, xa, keep = ctx.saved_tensors
        s, p = ctx.scaling, ctx.p
        g = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        gb = g @ B  # (N, r): the rank-first product every gradient below reuses
        scale = dropout_scale(p) if keep is not None else 1.0
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ (weight if ctx.weight_of is None else ctx.weight_of(g.dtype))  # dequantized again
            if keep is None:
                grad_x.addmm_(gb, A, alpha=s)
            else:
                tmp = scratch(x2)
                torch.mm(gb, A, out=tmp).mul_(keep)
                grad_x.add_(tmp, alpha=s * scale)
            grad_x = grad_x.view(x.shape)
        if ctx.needs_input_grad[3]:
            xd = x2 if keep is None else dropped(x2, keep)
            grad_a = (gb.t() @ xd).mul_(s * scale)
        if ctx.needs_input_grad[4]:
            grad_b = (g.t() @ xa).mul_(s)
        return grad_x, None, None, grad_a, grad_b, None, None, None, None


def lora_linear(
    x: torch.Tensor,
    base: nn.Linear,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """``base(x) + scaling·B·A·dropout(x)`` for a frozen nn.Linear, in one autograd node.

    Mixed precision follows autocast: under `torch.autocast` every operand is cast to the autocast dtype, and
    without it a 16-bit base takes float32 adapters (the optimizer's master weights) cast to its dtype. Either
    way the casts are autograd ops, so the adapters' gradients come back in float32."""
    return _lora(x, base.weight, None, base.bias, A, B, scaling, dropout, training)


def lora_linear_dense(
    x: torch.Tensor,
    weight_of: Callable[[torch.dtype], torch.Tensor],
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """`lora_linear` for a frozen base that stores its weight in another form (a 4-bit NF4 layer):
    ``weight_of(dtype)`` gives the dense weight for one use, in the forward and again in the backward, so no
    dense copy lives between the passes (what the base's own training forward does, lorakit.quant.nf4)."""
    return _lora(x, None, weight_of, bias, A, B, scaling, dropout, training)


def _lora(x, weight, weight_of, bias, A, B, scaling, dropout, training) -> torch.Tensor:
    p = dropout if training else 0.0
    seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        dt = torch.get_autocast_dtype(kind)
        with torch.autocast(kind, enabled=False):
            w = None if weight is None else weight.to(dt)
            b = None if bias is None else bias.to(dt)
            return _LoraLinear.apply(
                x.to(dt), w, b, A.to(dt), B.to(dt), float(scaling), float(p), seed, weight_of
            )
    if A.dtype != x.dtype:
        A, B = A.to(x.dtype), B.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return _LoraLinear.apply(x, weight, bias, A, B, float(scaling), float(p), seed, weight_of)


def can_fuse_dense(base: nn.Module, x: torch.Tensor, A: torch.Tensor) -> bool:
    """Whether `lora_linear_dense` computes what the plain path would for a base whose handler gives a dense
    weight: in training only (inference keeps the base's own forward, which for a 4-bit base multiplies a few
    rows straight from the codes), and a call both fused paths take (`_fusable_call`)."""
    return torch.is_grad_enabled() and _fusable_call(base, x, A, mixed=True)


def can_fuse(base: nn.Module, x: torch.Tensor, A: torch.Tensor, *, mixed: bool = True) -> bool:
    """Whether `lora_linear` computes what the plain path would for this call. `mixed`: also under autocast,
    and with float32 adapters on a 16-bit base (cast to its dtype, as autocast would)."""
    if type(base) is not nn.Linear:
        return False
    w = base.weight
    # a frozen weight, a plain tensor (no DTensor / quantized / meta subclass), in x's dtype unless autocast picks
    if w.requires_grad or type(w.data) is not torch.Tensor or not w.is_floating_point():
        return False
    if not torch.is_autocast_enabled(x.device.type) and x.dtype != w.dtype:
        return False
    return _fusable_call(base, x, A, mixed=mixed)


def _fusable_call(base: nn.Module, x: torch.Tensor, A: torch.Tensor, *, mixed: bool) -> bool:
    """What both fused paths need of a call: no hooks on the base, a frozen bias, plain floating-point x and
    adapters, and adapters in x's dtype (with `mixed`: also under autocast, or float32 adapters on a 16-bit x,
    cast as autocast would)."""
    if base._forward_hooks or base._forward_pre_hooks:
        return False
    bias = getattr(base, "bias", None)
    if bias is not None and bias.requires_grad:
        return False
    if type(A.data) is not torch.Tensor or type(x) is not torch.Tensor:
        return False
    if not (x.is_floating_point() and A.is_floating_point()):
        return False
    if torch.is_autocast_enabled(x.device.type):  # autocast picks each op's dtype
        return mixed
    return A.dtype == x.dtype or (mixed and A.dtype == torch.float32 and x.element_size() == 2)


# --------------------------------------------------------------------------------------------------------------
# LoRA linear from a precomputed x·Aᵀ (lorakit.siblings: one stacked product for q/k/v or gate/up)
# --------------------------------------------------------------------------------------------------------------


class _LoraFromXA(torch.autograd.Function):
    """``x·W0ᵀ + b + s·xa·Bᵀ`` where xa = x·Aᵀ was computed outside (as a slice of a stacked product)."""

    @staticmethod
    def forward(ctx, x, weight, bias, xa, B, scaling: float):
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        out.addmm_(xa, B.t(), alpha=scaling)
        ctx.save_for_backward(weight, B, xa)
        ctx.scaling, ctx.x_shape = scaling, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        weight, B, xa = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = (g @ weight).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_xa = (g @ B).mul_(ctx.scaling) if ctx.needs_input_grad[3] else None
        grad_b = (g.t() @ xa).mul_(ctx.scaling) if ctx.needs_input_grad[4] else None
        return grad_x, None, None, grad_xa, grad_b, None


def lora_from_xa(x, weight, bias, xa, B, scaling: float) -> torch.Tensor:
    """``x·W0ᵀ + b + scaling·xa·Bᵀ`` for a frozen W0, where xa = x·Aᵀ was computed outside, in one autograd node."""
    return _LoraFromXA.apply(x, weight, bias, xa, B, scaling)
