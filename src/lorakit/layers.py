"""LoRA wrapper modules.

A `LoraLayer` wraps (never subclasses) a base module and holds named adapters:

    forward(x) = base(x) + Σ_{active a} w_a · s_a · B_a(A_a(dropout(x)))

What differs between base layer types (Linear, Embedding, ConvNd, GPT-2 Conv1D) lives in a small `Handler`
picked from a table by type. What differs between LoRA flavours (plain, DoRA) lives in a `Variant` strategy, so the
plain path has no variant branches. All weight math goes through `delta_weight`, in the base weight's layout.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import fused
from lorakit.errors import AdapterError, QuantizationError
from lorakit.quant import bnb as bnb_interop
from lorakit.quant.nf4 import NF4Linear

# --------------------------------------------------------------------------------------------------------------
# Handlers: one per base layer type. A and B are stored in PEFT's shapes; `to_2d` views any base weight as
# (out_features, fan_in) so that ΔW = B2 @ A2 with A2 = A.flatten(1) (r, fan_in) and B2 = B.flatten(1) (out, r).
# --------------------------------------------------------------------------------------------------------------


class Handler:
    """How LoRA attaches to one kind of base layer."""

    linear: ClassVar[bool] = False  # counts for targets="all-linear"
    embedding: ClassVar[bool] = False  # PEFT names its tensors lora_embedding_A/B, no dropout
    feature_dim: ClassVar[int] = -1  # where out_features sits in the output tensor
    quantized: ClassVar[bool] = False  # a 4-bit base: weight() is a dequantized copy; merging is refused

    def dims(self, base: nn.Module) -> tuple[int, int]:
        """(out_features d, fan_in k) of the base weight seen as a d×k matrix."""
        w = self.to_2d(self.weight(base))
        return w.shape[0], w.shape[1]

    def shapes(self, base: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        d, k = self.dims(base)
        return (r, k), (d, r)

    def weight(self, base: nn.Module) -> torch.Tensor:
        return base.weight

    def dtype_device(self, base: nn.Module) -> tuple[torch.dtype, torch.device]:
        """dtype and device for new adapters: the base weight's (float32 if it is not floating point)."""
        w = self.weight(base)
        return (w.dtype if w.dtype.is_floating_point else torch.float32), w.device

    def to_2d(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def from_2d(self, d2: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return d2

    def check(self, base: nn.Module) -> str | None:
        """A reason this base layer cannot be wrapped, or None."""
        return None

    def lora(
        self, base: nn.Module, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float
    ) -> torch.Tensor:
        """s·B·A·x in the output layout. x: (..., in_features) -> (..., out_features)."""
        return F.linear(F.linear(x, A) * s, B)

    def base_nobias(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """W0·x without bias (DoRA needs it when dropout changed x)."""
        return F.linear(x, base.weight)

    def init(self, A: torch.Tensor, B: torch.Tensor, init: str, r: int) -> None:
        if init == "random":
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
            return
        if init == "gaussian":
            nn.init.normal_(A, std=1 / r)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(B)

    def magnitude_shape(self, d: int) -> tuple[int, ...]:
        return (d,)


class LinearHandler(Handler):
    linear = True


class QuantLinearHandler(LinearHandler):
    """lorakit's 4-bit `NF4Linear`: `weight` dequantizes a full-precision copy (read-only use: DoRA norms, export);
    merging into the base is refused, since it would have to re-quantize W0 + ΔW."""

    quantized = True

    def dims(self, base: nn.Module) -> tuple[int, int]:
        return base.out_features, base.in_features

    def weight(self, base: nn.Module) -> torch.Tensor:
        return base.dequantize()

    def dtype_device(self, base: nn.Module) -> tuple[torch.dtype, torch.device]:
        return base.weight_dtype, base.qweight.device

    def base_nobias(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, base.dequantize(x.dtype))


class Bnb4bitHandler(QuantLinearHandler):
    """bitsandbytes' `Linear4bit` (transformers' `BitsAndBytesConfig(load_in_4bit=True)`), NF4 or FP4."""

    def weight(self, base: nn.Module) -> torch.Tensor:
        return bnb_interop.dequantize_linear4bit(base, bnb_interop.weight_dtype(base))

    def dtype_device(self, base: nn.Module) -> tuple[torch.dtype, torch.device]:
        return bnb_interop.weight_dtype(base), base.weight.device

    def base_nobias(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, bnb_interop.dequantize_linear4bit(base, x.dtype))


def merge_refusal(base: nn.Module) -> str:
    return (
        f"cannot merge into a 4-bit base layer ({type(base).__name__}): the merged weight W0 + ΔW would have to "
        "be re-quantized, which rounds away most of the update. Write a merged full-precision model instead with "
        "`lorakit merge --adapter ADAPTER --out DIR` (it dequantizes the base, then merges), or call "
        "lorakit.dequantize(model) first"
    )


class TransposedHandler(Handler):
    """Base weights stored (fan_in, out_features): the 2-D view is the transpose."""

    def to_2d(self, w: torch.Tensor) -> torch.Tensor:
        return w.T

    def from_2d(self, d2: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return d2.T


class Conv1DHandler(TransposedHandler):
    """transformers' GPT-2 `Conv1D`: weight stored (in, out), i.e. fan-in-fan-out."""

    linear = True

    def base_nobias(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x @ base.weight


class EmbeddingHandler(TransposedHandler):
    """nn.Embedding (vocab, dim): A is (r, vocab), B is (dim, r); no dropout. PEFT's init: A zero, B normal."""

    embedding = True

    def lora(
        self, base: nn.Module, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float
    ) -> torch.Tensor:
        after_a = F.embedding(
            x, A.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )
        return (after_a * s) @ B.T

    def base_nobias(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return base(x)

    def init(self, A: torch.Tensor, B: torch.Tensor, init: str, r: int) -> None:
        if init == "random":
            nn.init.normal_(A)
        else:
            nn.init.zeros_(A)
        nn.init.normal_(B)


class ConvHandler(Handler):
    """nn.Conv1d/2d/3d: A is a conv with the base's kernel, stride, padding, dilation; B a 1×…×1 conv."""

    feature_dim = 1

    def __init__(self, ndim: int) -> None:
        self.ndim = ndim  # weight dims: 3 for Conv1d, 4 for Conv2d, 5 for Conv3d

    def shapes(self, base: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        w = base.weight
        ones = (1,) * (w.dim() - 2)
        return (r, w.shape[1], *w.shape[2:]), (w.shape[0], r, *ones)

    def to_2d(self, w: torch.Tensor) -> torch.Tensor:
        return w.flatten(1)

    def from_2d(self, d2: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return d2.reshape(base.weight.shape)

    def check(self, base: nn.Module) -> str | None:
        if base.groups != 1:
            return f"groups={base.groups} (only groups=1 convolutions can take LoRA)"
        if base.padding_mode != "zeros":
            return f"padding_mode={base.padding_mode!r} (only 'zeros' is supported)"
        return None

    def _conv(self, base: nn.Module):
        return {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[self.ndim]

    def lora(
        self, base: nn.Module, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float
    ) -> torch.Tensor:
        conv = self._conv(base)
        return conv(conv(x, A, None, base.stride, base.padding, base.dilation) * s, B)

    def base_nobias(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self._conv(base)(x, base.weight, None, base.stride, base.padding, base.dilation, base.groups)

    def magnitude_shape(self, d: int) -> tuple[int, ...]:
        return (1, d) + (1,) * (self.ndim - 2)


def _handler_table() -> list[tuple[type, Handler]]:
    table: list[tuple[type, Handler]] = [
        (nn.Linear, LinearHandler()),
        (NF4Linear, QuantLinearHandler()),
        (nn.Embedding, EmbeddingHandler()),
        (nn.Conv1d, ConvHandler(3)),
        (nn.Conv2d, ConvHandler(4)),
        (nn.Conv3d, ConvHandler(5)),
    ]
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for plain PyTorch models
        pass
    else:
        table.append((Conv1D, Conv1DHandler()))
    return table


HANDLERS = _handler_table()


class RefusedHandler(LinearHandler):
    """A linear layer type LoRA must not wrap as a plain nn.Linear (its weight is not a float matrix)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def check(self, base: nn.Module) -> str | None:
        return self.reason


def _register_bnb() -> None:
    """Add bitsandbytes' layers to the table once bitsandbytes is imported (they subclass nn.Linear, so they must
    come before nn.Linear's isinstance fallback)."""
    global _bnb_pending
    cls = bnb_interop.linear4bit_class()
    if cls is not None:
        import bitsandbytes as bnb

        HANDLERS.insert(0, (cls, Bnb4bitHandler()))
        refused = RefusedHandler("bitsandbytes 8-bit layers are not supported (4-bit Linear4bit layers are)")
        HANDLERS.insert(1, (bnb.nn.Linear8bitLt, refused))
        _bnb_pending = False


_bnb_pending = True


def handler_for(module: nn.Module) -> Handler | None:
    """The handler for `module` (a LoraLayer answers for its base), or None if LoRA cannot wrap it."""
    if isinstance(module, LoraLayer):
        return module.handler
    if _bnb_pending:
        _register_bnb()
    for cls, handler in HANDLERS:
        if type(module) is cls:
            return handler
    for cls, handler in HANDLERS:
        if isinstance(module, cls):
            return handler
    return None


def supported_type_names() -> str:
    return ", ".join(cls.__name__ for cls, _ in HANDLERS)


# --------------------------------------------------------------------------------------------------------------
# Variants: plain LoRA here; DoRA and others in lorakit.variants.
# --------------------------------------------------------------------------------------------------------------


class Variant:
    """Strategy for one LoRA flavour: extra state, forward delta, merge and unmerge. Plain LoRA is this class."""

    name: ClassVar[str] = "lora"

    def init(self, layer: LoraLayer, adapter: LoraAdapter) -> None:
        """Create variant state on `adapter` after A and B are initialised."""

    def factors(self, adapter: LoraAdapter) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, s) with ΔW = s·B·A at inference; DyLoRA returns the first b components and α/b."""
        return adapter.lora_A, adapter.lora_B, adapter.scaling

    def metadata(self) -> dict[str, str]:
        """Safetensors metadata the adapter file carries for this variant (read back by lorakit.variants)."""
        return {}

    def forward(
        self, layer: LoraLayer, adapter: LoraAdapter, x: torch.Tensor, base_out: torch.Tensor
    ) -> torch.Tensor:
        """The adapter's contribution to the output (to be added to base_out)."""
        A, B = adapter.lora_A, adapter.lora_B
        if x.is_floating_point() and x.dtype != A.dtype:
            x = x.to(A.dtype)
        y = layer.handler.lora(layer.base_layer, adapter.dropout(x), A, B, adapter.scaling)
        return y if y.dtype == base_out.dtype else y.to(base_out.dtype)

    @torch.no_grad()
    def merge(self, layer: LoraLayer, adapter: LoraAdapter, weight: float) -> object:
        """Fold the adapter (times `weight`) into the base weight in place; return what unmerge needs."""
        w = layer.handler.weight(layer.base_layer)
        w.add_(delta_weight(layer, adapter).to(w.dtype), alpha=weight)
        return None

    @torch.no_grad()
    def unmerge(self, layer: LoraLayer, adapter: LoraAdapter, weight: float, state: object) -> None:
        w = layer.handler.weight(layer.base_layer)
        w.sub_(delta_weight(layer, adapter).to(w.dtype), alpha=weight)


def make_variant(use_dora: bool) -> Variant:
    if use_dora:
        from lorakit.variants.dora import DoraVariant

        return DoraVariant()
    return Variant()


# --------------------------------------------------------------------------------------------------------------
# Adapter and layer modules
# --------------------------------------------------------------------------------------------------------------


class LoraAdapter(nn.Module):
    """One named adapter in one layer: A, B, scaling, dropout and optional variant state (e.g. DoRA magnitude)."""

    def __init__(
        self,
        a_shape: tuple[int, ...],
        b_shape: tuple[int, ...],
        *,
        r: int,
        alpha: float,
        scaling: float,
        dropout: float,
        variant: Variant,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(a_shape, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(b_shape, dtype=dtype, device=device))
        self.r, self.alpha, self.scaling = r, alpha, scaling
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.variant = variant
        self.magnitude: nn.Parameter | None = None
        self.lora_E: nn.Parameter | None = None  # AdaLoRA's singular values Λ (r, 1): ΔW = s·B·(Λ·A)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, variant={self.variant.name}"


def delta_weight(layer: LoraLayer, adapter: LoraAdapter) -> torch.Tensor:
    """ΔW = s·B·A for `adapter`, in the base weight's layout and the adapter's dtype."""
    A, B, s = adapter.variant.factors(adapter)
    a2 = A.flatten(1)
    if adapter.lora_E is not None:  # AdaLoRA: ΔW = s·P·(Λ⊙Q)
        a2 = a2 * adapter.lora_E
    return layer.handler.from_2d((B.flatten(1) @ a2) * s, layer.base_layer)


class LoraLayer(nn.Module):
    """A base module plus named adapters. Base weights are never copied; switching adapters changes dicts only."""

    def __init__(self, base_layer: nn.Module, handler: Handler) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.handler = handler
        self.adapters = nn.ModuleDict()
        self.active: dict[str, float] = {}  # adapter name -> weight
        self.merged: list[tuple[str, float, object]] = []  # (name, weight, unmerge state), in merge order
        self.disabled = False
        self._run: tuple[tuple[str, float], ...] = ()
        self.group = None  # lorakit.fused.SiblingGroup: layers sharing this layer's input (q/k/v, gate/up)
        self.row_plan = None  # lorakit.mixed.RowPlan while a mixed-adapter batch runs
        self.row_cache: tuple | None = None

    def add_adapter(
        self, name: str, *, r: int, alpha: float, scaling: float, dropout: float, init: str, use_dora: bool
    ) -> None:
        if self.handler.embedding:
            dropout = 0.0
        if init == "pissa" and self.handler.quantized:
            raise AdapterError(
                "PiSSA init moves the top-r part out of W0, which a 4-bit base cannot take; initialise PiSSA on "
                "the full-precision model (or use another init)"
            )
        a_shape, b_shape = self.handler.shapes(self.base_layer, r)
        dtype, device = self.handler.dtype_device(self.base_layer)
        adapter = LoraAdapter(
            a_shape,
            b_shape,
            r=r,
            alpha=alpha,
            scaling=scaling,
            dropout=dropout,
            variant=make_variant(use_dora),
            dtype=dtype,
            device=device,
        )
        if init == "pissa":
            from lorakit.variants.pissa import pissa_init

            pissa_init(self, adapter)
        else:
            self.handler.init(adapter.lora_A.data, adapter.lora_B.data, init, r)
        adapter.variant.init(self, adapter)
        self.adapters[name] = adapter
        self.row_cache = None

    def remove_adapter(self, name: str) -> None:
        adapter = self.adapters[name]
        residual = getattr(adapter, "pissa_residual", None)
        if residual is not None:  # PiSSA moved the top-r part out of W0: put it back
            with torch.no_grad():
                w = self.handler.weight(self.base_layer)
                w.add_(residual.to(w.dtype))
        del self.adapters[name]
        self.active.pop(name, None)
        self.row_cache = None
        self.refresh()

    def refresh(self) -> None:
        """Recompute which adapters the forward runs (active, not merged, not disabled)."""
        merged = {m[0] for m in self.merged}
        self._run = (
            ()
            if self.disabled
            else tuple((n, w) for n, w in self.active.items() if n not in merged and n in self.adapters)
        )

    def merge_active(self) -> None:
        if self.handler.quantized and any(n in self.adapters for n in self.active):
            raise QuantizationError(merge_refusal(self.base_layer))
        for name, weight in self.active.items():
            if name in self.adapters and all(m[0] != name for m in self.merged):
                adapter = self.adapters[name]
                self.merged.append((name, weight, adapter.variant.merge(self, adapter, weight)))
        self.refresh()

    def unmerge_all(self) -> None:
        while self.merged:
            name, weight, state = self.merged.pop()
            adapter = self.adapters[name]
            adapter.variant.unmerge(self, adapter, weight, state)
        self.refresh()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_plan is not None and not self.disabled:
            from lorakit.mixed import mixed_forward

            return mixed_forward(self, x, self.base_layer(x, *args, **kwargs))
        if len(self._run) == 1 and not args and not kwargs and fused.fused_enabled():
            name, w = self._run[0]
            adapter = self.adapters[name]
            if type(adapter.variant) is Variant and fused.can_fuse(self.base_layer, x, adapter.lora_A):
                drop = adapter.dropout.p if isinstance(adapter.dropout, nn.Dropout) else 0.0
                if self.group is not None and fused.groups_enabled() and (drop == 0.0 or not self.training):
                    y = self.group.forward(self, x)
                    if y is not None:
                        return y
                return fused.lora_linear(
                    x,
                    self.base_layer,
                    adapter.lora_A,
                    adapter.lora_B,
                    adapter.scaling * w,
                    drop,
                    self.training,
                )
        out = self.base_layer(x, *args, **kwargs)
        if not self._run:
            return out
        base_out = out
        for name, w in self._run:
            adapter = self.adapters[name]
            delta = adapter.variant.forward(self, adapter, x, base_out)
            out = out + delta if w == 1.0 else out + w * delta
        return out

    def extra_repr(self) -> str:
        return f"active={self.active}, merged={[m[0] for m in self.merged]}"
