"""Give freed heap memory back to the operating system between a training step's layers (glibc only).

A QLoRA step on a large model allocates and frees the same few activation-sized tensors (2-11 MB each on a 7B
model) in every decoder layer. glibc serves them from its heap (its mmap threshold rises to 32 MB after the first
large free), and the freed chunks are not reused well: on a generated Llama-2-7B at batch 1x256 with gradient
checkpointing, the heap grew by ~35 MB a layer while the memory in use grew by ~5 MB, so 1.1-1.3 GB of the step's
peak RSS was free heap (`mallinfo2`). `malloc_trim(0)` after each decoder layer's forward (also the recomputed
forward under checkpointing) hands those pages back: peak RSS 5.35 GB instead of 6.00 GB (docs/scale.md).

`trim_between_layers(model)` installs that as forward hooks on the model's decoder layers (transformers'
`GradientCheckpointingLayer`s) and returns a handle that removes them. `trim_wanted(model)` decides: the
``LORAKIT_TRIM`` environment variable (``1``/``0``) where set, else on for a quantized base (where weights no
longer dominate and the heap's waste shows), off otherwise. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

from torch import nn

from lorakit.envflags import env_flag

ENV = "LORAKIT_TRIM"


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim with
        return None
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def trim() -> bool:
    """Return the heap's free pages to the operating system; False where the C library cannot."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True


def trim_wanted(model: nn.Module) -> bool:
    """`LORAKIT_TRIM` (1 or 0) where set; else True for a quantized base."""
    forced = env_flag(ENV)
    if forced is not None:
        return forced
    from lorakit.quant.apply import is_quantized

    return is_quantized(model)


class _Handles:
    def __init__(self, handles: list) -> None:
        self.handles = handles

    def __len__(self) -> int:
        return len(self.handles)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _after_layer(module: nn.Module, args: Any, output: Any) -> None:
    trim()  # returns None: the layer's output is left as it is


def trim_between_layers(model: nn.Module, enabled: bool | None = None) -> _Handles:
    """Trim the heap after every decoder layer's forward while the handle lives (`enabled` None: `trim_wanted`).
    Returns the handle (`.remove()`); empty where not wanted or where the C library cannot trim."""
    if enabled is None:
        enabled = trim_wanted(model)
    if not enabled or _malloc_trim() is None:
        return _Handles([])
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return _Handles([])
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    return _Handles([m.register_forward_hook(_after_layer) for m in layers])


def enable_checkpointing(model: nn.Module) -> bool:
    """Turn on transformers' activation (gradient) checkpointing of `model`'s decoder layers, non-reentrant, and
    make the inputs require grad (so that a frozen embedding still feeds the checkpointed graph). transformers 5
    names it `activation_checkpointing_enable` and deprecates the older `gradient_checkpointing_enable` (gone in
    v6); the older name is used where the newer is missing. Returns False if the model has neither."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        return False
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return True
