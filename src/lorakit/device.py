"""Where a model runs and in what precision: `--model.device` and `--model.dtype`, resolved once, then recorded.

- device: `auto` (CUDA when torch sees a GPU, else the CPU), `cpu`, `cuda` or `cuda:N`. Under torchrun, `auto`
  and `cuda` mean `cuda:LOCAL_RANK`, one GPU per process.
- dtype of the frozen base: `auto` is bfloat16 on a GPU that has it, float16 on one that does not, and float32
  on the CPU (where bf16 is fast on some CPUs and ~24x slow on others: lorakit does not guess). The adapters stay
  in float32 (`adapter_dtype`), so that AdamW's small updates are not rounded away by bf16's 8 significant bits;
  on a GPU the forward runs under autocast in the base dtype, and the loss is computed in float32.
"""

from __future__ import annotations

import os
import re
from contextlib import AbstractContextManager, nullcontext

import torch

from lorakit.errors import ConfigError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_CHOICES = "auto, float32, bfloat16 or float16"


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device `spec` names; ConfigError, in one line, for a device this machine does not have."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = (spec or "auto").strip().lower()
    local = os.environ.get("LOCAL_RANK")
    if text == "auto":
        return torch.device("cuda", _local_index(local)) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", text)
    if m is None:
        raise ConfigError(f"device {spec!r} is not one lorakit knows: {DEVICE_CHOICES}", key="device")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device {spec!r}: this torch ({torch.__version__}) sees no CUDA GPU; use cpu (or auto)",
            key="device",
        )
    index = int(m[1]) if m[1] is not None else _local_index(local)
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {spec!r}: there are {torch.cuda.device_count()} CUDA device(s), cuda:0 to "
            f"cuda:{torch.cuda.device_count() - 1}",
            key="device",
        )
    return torch.device("cuda", index)


def _local_index(local: str | None) -> int:
    return int(local) if local is not None and local.isdigit() else 0


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The base's dtype: `spec`, or for `auto` (None) the one that suits `device`."""
    if isinstance(spec, torch.dtype):
        return spec
    text = (spec or "auto").strip().lower()
    if text == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if text not in DTYPES:
        raise ConfigError(f"dtype {spec!r} is not one lorakit knows: {DTYPE_CHOICES}", key="dtype")
    return DTYPES[text]


def placement(
    device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = "auto"
) -> tuple[torch.device, torch.dtype]:
    """(device, base dtype) as `--device` and `--dtype` name them: `resolve_device`, then `resolve_dtype` for it."""
    where = resolve_device(device)
    return where, resolve_dtype(dtype, where)


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the name `resolve_dtype` takes back)."""
    return str(dtype).removeprefix("torch.")


def autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """The compute precision of a forward pass: autocast to the base's 16-bit dtype on a GPU (float32 adapters
    then multiply in that dtype too), nothing on the CPU or in float32."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (the CPU for a model without any)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch of tensors on `device` (unchanged, no copies, where it already is)."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def upcast_trainable(model: torch.nn.Module) -> int:
    """Put the trainable floating-point parameters (the adapters) in float32, in place; returns how many moved.
    They are the optimizer's master weights: in bf16 AdamW's small updates would mostly round away."""
    moved = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            moved += 1
    return moved


def peak_memory_gb(device: torch.device) -> float | None:
    """The peak of `torch.cuda.max_memory_allocated` on a GPU, in GB; None on the CPU (where RSS is reported)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1e9
