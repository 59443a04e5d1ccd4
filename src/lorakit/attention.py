"""Attention for training on the CPU in bf16: the forward in bf16, the backward in fp32 where that is faster.

PyTorch's CPU flash-attention backward is slow in bf16 (and fp16) on short sequences: at 77 tokens, 9 heads of 64,
it took 18 ms against 5 ms for the same backward in fp32 on the upcast tensors, and about 2× at 128 tokens
(`benchmarks/bench_attention.py`). From about 256 tokens on, bf16 is as fast or faster. lorakit's main job trains on
rows of about 80 tokens, so under bf16 a third of its step went to this one kernel.

`inject` switches a Hugging Face model that uses transformers' ``sdpa`` attention to ``lorakit_sdpa``
(`set_lean_attention`, with the lean loss and blocks; `inject(..., lean=False)` leaves it out; `unload` switches
back). That implementation is transformers' own SDPA function except in one case: on the CPU, in a 16-bit dtype,
with gradients, no dropout, and keys short enough (``kv_len × head_dim ≤ 8192``) that the fp32 backward wins. There
it calls the same flash kernel forward (so the output is bitwise the same) and computes the backward with the fp32
kernel on upcast copies of q, k, v, the output and its gradient, then rounds the gradients back. The backward is
then more exact than the bf16 kernel's, not less. Masks and everything else are transformers'. Every training loop
gets it: lorakit's, a plain loop, `Trainer`, and TRL's `SFTTrainer` (with its default gradient checkpointing).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from lorakit.walk import base_modules

NAME = "lorakit_sdpa"
MAX_KV_TIMES_HEAD_DIM = 8192  # the fp32 backward wins below this (bench_attention.py), loses from about 2× above
_FLASH = 1  # torch._fused_sdp_choice's code for the flash kernel (SDPBackend.FLASH_ATTENTION)
_FIELD = "_attn_implementation_internal"  # what PretrainedConfig._attn_implementation reads
_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


class _FlashUpcastBackward(torch.autograd.Function):
    """CPU flash attention: the forward in the inputs' dtype, the backward in fp32."""

    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal: bool, scale: float | None):
        out, lse = _fwd(q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, mask = ctx.saved_tensors
        f = torch.float32
        gq, gk, gv = _bwd(
            grad.to(f),
            q.to(f),
            k.to(f),
            v.to(f),
            out.to(f),
            lse,
            0.0,
            ctx.is_causal,
            attn_mask=None if mask is None else mask.to(f),
            scale=ctx.scale,
        )
        return gq.to(q.dtype), gk.to(k.dtype), gv.to(v.dtype), None, None, None


def upcast_backward_wins(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether the fp32 backward is the faster one for these shapes and dtype (on the CPU, 16-bit, short keys)."""
    return (
        query.device.type == "cpu"
        and query.dtype in (torch.bfloat16, torch.float16)
        and key.shape[-2] * key.shape[-1] <= MAX_KV_TIMES_HEAD_DIM
    )


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, scale: float | None
) -> torch.Tensor:
    """``scaled_dot_product_attention(q, k, v, mask, is_causal=..., scale=...)`` (B, H, T, D), through the CPU flash
    kernel with the fp32 backward. `mask` is None or boolean (True: attend), broadcast over heads."""
    if mask is not None:  # what scaled_dot_product_attention does with a boolean mask: 0 where kept, -inf elsewhere
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    return _FlashUpcastBackward.apply(q, k, v, mask, is_causal, scale)


def lorakit_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa`` attention, with the fp32 backward where `upcast_backward_wins`."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    q_len = query.shape[2]
    plain = (
        dropout == 0.0
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
        and not kwargs.get("output_attentions", False)
        and q_len == key.shape[2]
        and (attention_mask is None or (attention_mask.dtype == torch.bool and attention_mask.ndim == 4))
    )
    grads = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    if plain and grads and upcast_backward_wins(query, key):
        groups = getattr(module, "num_key_value_groups", 1)
        k, v = repeat_kv(key, groups), repeat_kv(value, groups)  # the fallback below repeats its own
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(q_len > 1 and attention_mask is None and causal)
        if torch._fused_sdp_choice(query, k, v, attention_mask, 0.0, causal) == _FLASH:
            out = flash_attention(query, k, v, attention_mask, causal, scaling)
            return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, lorakit_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def _configs(model: nn.Module, implementation: str) -> list[Any]:
    """The distinct configs of `model`'s modules whose attention implementation is `implementation`."""
    seen: dict[int, Any] = {}
    for _, m in base_modules(model):
        cfg = getattr(m, "config", None)
        if id(cfg) not in seen and getattr(cfg, _FIELD, None) == implementation:
            seen[id(cfg)] = cfg
    return list(seen.values())


def set_lean_attention(model: nn.Module, enabled: bool) -> int:
    """Switch `model`'s transformers ``sdpa`` attention to ``lorakit_sdpa`` (True) or back (False); returns how
    many of its configs use ``lorakit_sdpa`` afterwards.

    The switch lasts while the adapter is injected, not one forward: gradient checkpointing recomputes a layer's
    forward during backward, and that must take the attention the first forward took. ``lorakit_sdpa`` is
    transformers' function wherever the fp32 backward does not apply, so inference, generation and other devices
    run exactly as before. The field is the config's private ``_attn_implementation_internal``, which
    `save_pretrained` never writes (the property's setter would also overwrite sub-configs)."""
    if enabled:
        found = _configs(model, "sdpa")  # only transformers' configs carry the field
        if found:
            _register()
        for cfg in found:
            setattr(cfg, _FIELD, NAME)
    else:
        for cfg in _configs(model, NAME):
            setattr(cfg, _FIELD, "sdpa")
    return lean_attention(model)


def lean_attention(model: nn.Module) -> int:
    """How many of `model`'s configs select ``lorakit_sdpa``."""
    return len(_configs(model, NAME))
