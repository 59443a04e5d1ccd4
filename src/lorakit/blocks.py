"""Exact rewrites of a frozen base's blocks, for training: the Llama family's SwiGLU MLP, RMSNorm and RoPE.

The bound of a LoRA step is the base model's own forward and backward, and part of it is not matmuls: autograd
runs each elementwise op as its own pass over memory, allocates its output, and saves what its backward needs.
Three rewrites do the same math in fewer passes, each as one autograd node:

* ``swiglu``: ``down(silu(gate(x)) * up(x))``. Autograd keeps gate's output for SiLU's backward, SiLU's output
  and up's output for the product's: three N×I tensors per layer (I, the MLP width, is 2.7× the model width on
  SmolLM2). `silu_mul` keeps only gate's and up's outputs and recomputes SiLU in backward; SiLU's derivative is
  PyTorch's own ``silu_backward`` kernel, as in autograd.
* ``rmsnorm``: ``w · (x / rms(x))``. Autograd runs it as six ops forward and about ten backward (pow, mean,
  rsqrt, two products, their gradients, and the sum of the two paths into ∂x). `rms_norm` computes the forward
  in three passes and ∂x = r·(g·w) − x·r³·mean(g·w·x) in four, saving x and the N×1 reciprocal r only; the
  bf16 case keeps x in bf16 instead of autograd's float32 copy.
* ``rope``: ``q·cos + rotate_half(q)·sin`` for q and k. Autograd allocates the rotated copy (two slices, a
  negation, a cat), two products and a sum, and the same again backward. `rope` writes ``q·cos`` and adds the
  two rotated half-products into it in place, bitwise as transformers computes them; backward is the transposed
  map, the same way. It saves cos and sin
  only. It lives in a training forward of the attention module (`ATTENTION_CLASSES`: the same code as
  transformers', with `rope` in place of ``apply_rotary_pos_emb``).

Each applies to modules whose class is listed here (their forward is exactly that expression), with frozen
weights, and only while gradients are being recorded; inference and generation run the module's own forward.
`inject` installs them with the lean loss (`inject(..., lean=False)` leaves the blocks alone too);
`set_lean_blocks` switches them, all or by kind. What each saves is measured in `benchmarks/bench_blocks.py`
and docs/performance.md.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.walk import base_modules

SWIGLU_CLASSES = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "SmolLM3MLP", "Olmo2MLP"})
RMSNORM_CLASSES = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
# attention classes whose forward is Llama's; the value says where their sliding window comes from
ATTENTION_CLASSES = {"LlamaAttention": None, "MistralAttention": "config", "Qwen2Attention": "module"}
KINDS = ("swiglu", "rmsnorm", "rope")
_HALF_OR_SINGLE = (torch.float32, torch.bfloat16, torch.float16)
_MARK = "_lorakit_lean_block"  # on a rewritten forward: its kind
_KIND = "_lorakit_block"  # on a rewritten module: its kind (kept while something else removes the forward)


# --------------------------------------------------------------------------------------------------------------
# SwiGLU
# --------------------------------------------------------------------------------------------------------------


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        out = F.silu(gate)
        out.mul_(up)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_up = F.silu(gate).mul_(grad) if ctx.needs_input_grad[1] else None  # silu recomputed, not stored
        grad_gate = None
        if ctx.needs_input_grad[0]:  # torch's own SiLU derivative kernel, on grad·up
            grad_gate = torch.ops.aten.silu_backward(torch.mul(grad, up), gate)
        return grad_gate, grad_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in one autograd node that saves only `gate` and `up`."""
    if gate.dtype != up.dtype or gate.shape != up.shape:
        return F.silu(gate) * up
    return _SiluMul.apply(gate, up)


def _swiglu_forward(cls_forward):
    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return cls_forward(self, x)
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))

    return forward


def _is_swiglu(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return (
        type(module).__name__ in SWIGLU_CLASSES
        and type(act).__name__ in ("SiLU", "SiLUActivation")
        and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
    )


# --------------------------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------------------------


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(_acc(x))  # x itself when it is float32, as in transformers' forward
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, weight, r)
        return (xf * r).to(x.dtype).mul_(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, r = ctx.saved_tensors
        acc = _acc(x)
        gw = (grad * weight).to(acc)  # as transformers' graph: the product in the input dtype, then float32
        xf = x.to(acc)
        coef = torch.linalg.vecdot(gw, xf).unsqueeze(-1).mul_(r.pow(3)).div_(-x.shape[-1])
        return gw.mul_(r).addcmul_(xf, coef).to(x.dtype), None, None


def _acc(x: torch.Tensor) -> torch.dtype:
    """float32, or float64 for a float64 input (transformers would round it to float32; gradcheck needs float64)."""
    return torch.promote_types(x.dtype, torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm, ``weight · (x·rsqrt(mean(x²) + eps))`` (computed in float32, cast back to x's
    dtype before the weight), in one autograd node that saves x and the N×1 reciprocal only. The weight is frozen:
    it gets no gradient."""
    return _RMSNorm.apply(x, weight, float(eps))


def _rmsnorm_forward(cls_forward):
    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        # float64 too keeps the module's own forward: transformers rounds it to float32, the function would not
        if (
            not torch.is_grad_enabled()
            or w.requires_grad
            or w.dtype != x.dtype
            or x.dtype not in _HALF_OR_SINGLE
        ):
            return cls_forward(self, x)
        return rms_norm(x, w, self.variance_epsilon)

    return forward


def _is_rmsnorm(module: nn.Module) -> bool:
    return type(module).__name__ in RMSNORM_CLASSES and hasattr(module, "variance_epsilon")


# --------------------------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------------------------


def _rotate_into(
    out: torch.Tensor, x: torch.Tensor, sin: torch.Tensor, transpose: bool = False
) -> torch.Tensor:
    """``out += rotate_half(x)·sin`` = ``(−x₂·s₁, x₁·s₂)``, or with `transpose` the transposed map,
    ``out += (x₂·s₂, −x₁·s₁)``, in place on the two halves. Each product is rounded before it is added, as in
    transformers' expression (no fused multiply-add), so the result is bitwise theirs."""
    h = x.shape[-1] // 2
    if transpose:
        out[..., :h].add_(x[..., h:] * sin[..., h:])
        out[..., h:].sub_(x[..., :h] * sin[..., :h])
    else:
        out[..., :h].sub_(x[..., h:] * sin[..., :h])
        out[..., h:].add_(x[..., :h] * sin[..., h:])
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        ctx.save_for_backward(cos, sin)
        return _rotate_into(q * cos, q, sin), _rotate_into(k * cos, k, sin)

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor, grad_k: torch.Tensor):
        cos, sin = ctx.saved_tensors  # the map is linear: its gradient is the transposed map
        gq = None if grad_q is None else _rotate_into(grad_q * cos, grad_q, sin, transpose=True)
        gk = None if grad_k is None else _rotate_into(grad_k * cos, grad_k, sin, transpose=True)
        return gq, gk, None, None


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin)`` in one autograd node that saves cos and sin only
    (they take no gradient)."""
    if not (q.dtype == k.dtype == cos.dtype == sin.dtype) or q.shape[-1] % 2:  # mixed dtypes promote: theirs
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
    return _Rope.apply(q, k, cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim))


def _attention_forward(cls_forward, window_from):
    """Training forward of a Llama-style attention module: transformers' code, with `rope`."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if not torch.is_grad_enabled() or args or cache is not None or position_embeddings is None:
            return cls_forward(self, hidden_states, position_embeddings, attention_mask, *args, **kwargs)
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        kwargs.pop("cache", None)
        kwargs.pop("past_key_values", None)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = rope(query, key, cos, sin)
        eager = sys.modules[type(self).__module__].eager_attention_forward
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
        if window_from == "config":
            kwargs["sliding_window"] = getattr(self.config, "sliding_window", None)
        elif window_from == "module":
            kwargs["sliding_window"] = self.sliding_window
        out, weights = interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights

    return forward


def _is_attention(module: nn.Module) -> bool:
    name = type(module).__name__
    if name not in ATTENTION_CLASSES:
        return False
    needed = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "config", "attention_dropout")
    if ATTENTION_CLASSES[name] == "module":
        needed += ("sliding_window",)
    owner = sys.modules.get(type(module).__module__)
    return all(hasattr(module, n) for n in needed) and hasattr(owner, "eager_attention_forward")


# --------------------------------------------------------------------------------------------------------------
# Installing them
# --------------------------------------------------------------------------------------------------------------


def _rewrite(module: nn.Module):
    """(kind, the rewritten forward's factory) for a module that has a rewrite, else None."""
    if _is_swiglu(module):
        return "swiglu", _swiglu_forward
    if _is_rmsnorm(module):
        return "rmsnorm", _rmsnorm_forward
    if _is_attention(module):
        window_from = ATTENTION_CLASSES[type(module).__name__]
        return "rope", lambda cls_forward: _attention_forward(cls_forward, window_from)
    return None


def _kinds(enabled: bool | str | Iterable[str]) -> frozenset[str]:
    if isinstance(enabled, bool):
        return frozenset(KINDS) if enabled else frozenset()
    kinds = frozenset([enabled] if isinstance(enabled, str) else enabled)
    unknown = kinds - set(KINDS)
    if unknown:
        raise ValueError(f"unknown block rewrite {sorted(unknown)[0]!r}; known: {', '.join(KINDS)}")
    return kinds


def _install(module: nn.Module, rewrite: tuple[str, Callable] | None) -> bool:
    """Put `rewrite` (kind, factory; from `_rewrite`) on `module` as its instance forward; False for None."""
    if rewrite is None:
        return False
    kind, factory = rewrite
    forward = factory(type(module).forward)
    setattr(forward, _MARK, kind)
    # bound to the module: `copy.deepcopy` of the model rebinds it to the copy
    module.forward = forward.__get__(module, type(module))
    module.__dict__[_KIND] = kind
    return True


def _restore_children(parent: nn.Module, args) -> None:
    """Forward pre-hook on the parent of a rewritten block: put the rewrite back if something took it away.

    transformers (5.x, with the `kernels` package it depends on) re-"kernelizes" a model on every switch between
    train and eval mode, and where no hub kernel is mapped for a decorated class (RMSNorm, on the CPU or offline)
    it restores the class forward by deleting the instance's. A block whose instance forward is missing is given
    ours back before its parent runs it in training; a block that has another forward (a hub kernel) is left
    alone."""
    if (
        not torch.is_grad_enabled()
    ):  # the rewrites only act while gradients are recorded: no cost in inference
        return
    for child in parent.children():
        if _KIND in child.__dict__ and "forward" not in child.__dict__:
            _install(child, _rewrite(child))


def _sync(module: nn.Module, kinds: frozenset[str]) -> bool:
    """Install or remove `module`'s rewrite as `kinds` says; return whether it carries one afterwards."""
    current = module.__dict__.get("forward")
    if current is not None and not getattr(current, _MARK, None):  # someone else's forward (a hub kernel)
        module.__dict__.pop(_KIND, None)
        return False
    ours = module.__dict__.get(_KIND)
    if ours and ours in kinds:
        return current is not None or _install(module, _rewrite(module))
    if ours:  # a kind no longer wanted
        module.__dict__.pop("forward", None)
        module.__dict__.pop(_KIND, None)
        return False
    rewrite = _rewrite(module)
    return rewrite is not None and rewrite[0] in kinds and _install(module, rewrite)


def set_lean_blocks(model: nn.Module, enabled: bool | str | Iterable[str]) -> int:
    """Install the training rewrites of `model`'s blocks: all (True), none (False), or the kinds named (one, or a
    collection of `KINDS`: "swiglu", "rmsnorm", "rope"); the others are removed. An unknown kind raises ValueError
    before anything changes. Returns how many blocks carry one afterwards."""
    kinds = _kinds(enabled)
    count = int(_sync(model, kinds))
    for _, parent in base_modules(model):
        carried = [_sync(child, kinds) for child in parent.children()]
        count += sum(carried)
        hooks = parent._forward_pre_hooks
        ours = [key for key, hook in hooks.items() if hook is _restore_children]
        if any(carried) and not ours:
            parent.register_forward_pre_hook(_restore_children)
        elif not any(carried):
            for key in ours:
                del hooks[key]
    return count


def lean_blocks(model: nn.Module, kind: str | None = None) -> int:
    """How many of `model`'s blocks run a training rewrite (of `kind` only, if given)."""
    marks = (m.__dict__.get(_KIND) for _, m in base_modules(model))
    return sum(1 for mark in marks if mark and (kind is None or mark == kind))
