"""How LoRA attaches to each kind of base layer: one small `Handler` per layer type, looked up in a table.

A and B are stored in PEFT's shapes; `to_2d` views any base weight as (out_features, fan_in) so that
ΔW = B2 @ A2 with A2 = A.flatten(1) (r, fan_in) and B2 = B.flatten(1) (out, r).

The table holds nn.Linear, nn.Embedding, nn.Conv1d/2d/3d and transformers' GPT-2 `Conv1D`. Plug-ins add their
layer types with `register_handler` (lorakit.quant registers its 4-bit layers and bitsandbytes'). A type can be
registered by its dotted name ("bitsandbytes.nn.Linear4bit"): it is looked up only once its module has been
imported by someone else, so registering never imports a heavy optional package. The most specific registered
class in a module's MRO wins, so a subclass of nn.Linear gets its own handler, not nn.Linear's.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


class Handler:
    """How LoRA attaches to one kind of base layer."""

    linear: ClassVar[bool] = False  # counts for targets="all-linear"
    embedding: ClassVar[bool] = False  # PEFT names its tensors lora_embedding_A/B, no dropout
    feature_dim: ClassVar[int] = -1  # where out_features sits in the output tensor
    quantized: ClassVar[bool] = False  # a 4-bit base: weight() is a dequantized copy

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

    def merge_refusal(self, base: nn.Module) -> str | None:
        """A reason adapters cannot be merged into this base layer's weight, or None (they can)."""
        return None

    def lora(
        self, base: nn.Module, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float
    ) -> torch.Tensor:
        """s·B·A·x in the output layout. x: (..., in_features) -> (..., out_features)."""
        return F.linear(F.linear(x, A) * s, B)

    def base_nobias(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """W0·x without bias (DoRA needs it when dropout changed x)."""
        return F.linear(x, base.weight)

    def dense_weight(self, base: nn.Module) -> Callable[[torch.dtype], torch.Tensor] | None:
        """For a base that stores its weight in another form (4 bits): a function that gives the weight, dense,
        in a dtype, for one use at once (it may reuse a buffer), so that training can run the fused LoRA layer
        on it (lorakit.fused). None: no such function (nn.Linear's own weight is used directly)."""
        return None

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


class RefusedHandler(LinearHandler):
    """A linear layer type LoRA must not wrap as a plain nn.Linear (its weight is not a float matrix)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def check(self, base: nn.Module) -> str | None:
        return self.reason


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


# --------------------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------------------

_TYPES: dict[type, Handler] = {}
_PENDING: dict[str, Handler] = {}  # "package.module.Class" -> handler, until that module is imported


def register_handler(cls: type | str, handler: Handler) -> None:
    """Make `handler` the one for base layers of type `cls` (and its subclasses that have none of their own).

    `cls` may be a dotted name such as "bitsandbytes.nn.Linear4bit": it is resolved when that module is imported
    by someone else; registering it imports nothing. A later registration for the same type replaces the earlier.
    """
    if not isinstance(handler, Handler):  # checked first: a refused registration leaves the table as it was
        raise TypeError(f"register_handler takes a lorakit Handler, not {type(handler).__name__}")
    if isinstance(cls, str):
        _PENDING[cls] = handler
    elif isinstance(cls, type) and issubclass(cls, nn.Module):
        _TYPES[cls] = handler
    else:
        raise TypeError(f"register_handler takes an nn.Module subclass or its dotted name, not {cls!r}")


def _resolve_pending() -> None:
    for dotted in list(_PENDING):
        module, _, attr = dotted.rpartition(".")
        top = module.partition(".")[0]
        if top not in sys.modules:
            continue
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):  # the package is there but lacks the class: nothing to register
            _PENDING.pop(dotted)
            continue
        _TYPES[cls] = _PENDING.pop(dotted)


def handler_for(module: nn.Module) -> Handler | None:
    """The handler for `module` (a LoRA layer answers for its base), or None if LoRA cannot wrap it."""
    own = getattr(module, "handler", None)
    if isinstance(own, Handler) and hasattr(module, "base_layer"):
        return own
    if _PENDING:
        _resolve_pending()
    for cls in type(module).__mro__:
        handler = _TYPES.get(cls)
        if handler is not None:
            return handler
    return None


def all_handlers() -> list[Handler]:
    """Every registered handler, once each (e.g. to know every key form an adapter tensor can take)."""
    return list({id(h): h for h in [*_TYPES.values(), *_PENDING.values()]}.values())


def supported_type_names() -> str:
    if _PENDING:
        _resolve_pending()
    return ", ".join(cls.__name__ for cls in _TYPES)


register_handler(nn.Linear, LinearHandler())
register_handler(nn.Embedding, EmbeddingHandler())
register_handler(nn.Conv1d, ConvHandler(3))
register_handler(nn.Conv2d, ConvHandler(4))
register_handler(nn.Conv3d, ConvHandler(5))
register_handler("transformers.pytorch_utils.Conv1D", Conv1DHandler())
