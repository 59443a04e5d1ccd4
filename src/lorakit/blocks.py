"""Exact rewrites of a frozen base's blocks, for training: the Llama family's SwiGLU MLP.

The bound of a LoRA step is the base model's own forward and backward, and part of it is not matmuls: autograd
runs and saves what each elementwise op needs. In a SwiGLU MLP, ``down(silu(gate(x)) * up(x))``, it keeps gate's
output for SiLU's backward, SiLU's output and up's output for the product's: three N×I tensors per layer (I, the
MLP width, is 2.7× the model width on SmolLM2), and it allocates SiLU's output and the product separately. The
rewrite computes the product in one autograd node (`silu_mul`) that keeps only gate's and up's outputs and
recomputes SiLU in backward; SiLU's derivative is PyTorch's own ``silu_backward`` kernel, as in autograd.

It applies to modules whose class is one of `SWIGLU_CLASSES` (their forward is exactly that expression) with a
SiLU activation, only when gradients are being recorded; inference runs the module's own forward. `inject`
installs it with the lean loss (`inject(..., lean=False)` leaves the blocks alone too); `set_lean_blocks`
switches it.

RMSNorm and RoPE were measured as candidates too (docs/performance.md): see there for what earned its place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SWIGLU_CLASSES = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "SmolLM3MLP", "Olmo2MLP"})
_MARK = "_lorakit_lean_block"


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


def _swiglu_forward(module: nn.Module, cls_forward):
    """The rewrite, bound to `module` (a bound method: `copy.deepcopy` of the model rebinds it to the copy)."""

    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return cls_forward(self, x)
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))

    setattr(forward, _MARK, True)
    return forward.__get__(module, type(module))


def _is_swiglu(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return (
        type(module).__name__ in SWIGLU_CLASSES
        and type(act).__name__ in ("SiLU", "SiLUActivation")
        and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
    )


def set_lean_blocks(model: nn.Module, enabled: bool) -> int:
    """Install (True) or remove (False) the training rewrites of `model`'s blocks; returns how many blocks carry
    one afterwards."""
    count = 0
    for module in model.modules():
        current = module.__dict__.get("forward")
        ours = getattr(current, _MARK, False)
        if not enabled:
            if ours:
                del module.__dict__["forward"]
            continue
        if ours:
            count += 1
        elif current is None and _is_swiglu(module):
            module.forward = _swiglu_forward(module, type(module).forward)
            count += 1
    return count


def lean_blocks(model: nn.Module) -> int:
    """How many of `model`'s blocks run a training rewrite."""
    return sum(getattr(m.__dict__.get("forward"), _MARK, False) for m in model.modules())
