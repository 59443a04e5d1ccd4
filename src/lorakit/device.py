"""Where a model runs and in what precision: `--model.device` and `--model.dtype`, resolved once, then recorded.

- device: `auto` (CUDA when torch sees a GPU, else the CPU), `cpu`, `cuda` or `cuda:N`. Under torchrun, `auto`
  and `cuda` mean `cuda:LOCAL_RANK`, one GPU per process.
- dtype of the frozen base: `auto` is bfloat16 on a GPU that has it, float16 on one that does not; on the CPU it
  is bfloat16 where the CPU multiplies bf16 natively (AVX512-BF16 or AMX) and a timed probe confirms it is
  faster than float32, else float32 (bf16 is ~3x faster than fp32 on some CPUs and ~24x slower on others). The
  probe's verdict is cached per machine (`cpu_bf16_native`). The adapters stay in float32 (`adapter_dtype`), so
  that AdamW's small updates are not rounded away by bf16's 8 significant bits; a training forward runs under
  autocast in the base dtype, on a GPU and on the CPU; the loss is computed in float32.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from contextlib import AbstractContextManager, nullcontext, suppress

import torch

from lorakit.envflags import cache_root, env_flag
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
        return torch.bfloat16 if cpu_bf16_native() else torch.float32
    if text not in DTYPES:
        raise ConfigError(f"dtype {spec!r} is not one lorakit knows: {DTYPE_CHOICES}", key="dtype")
    return DTYPES[text]


BF16_FLAGS = ("avx512_bf16", "amx_bf16")
PROBE_SHAPE = (1024, 576, 1536)  # a SmolLM2 projection at batch 4 x 256: (tokens, in, out)
PROBE_MIN_SPEEDUP = 1.2  # bf16 must beat fp32 by this much to be chosen (a margin over timing noise)


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_bf16_native(*, refresh: bool = False) -> bool:
    """Whether bfloat16 matmuls are natively fast on this CPU: a bf16 instruction set (AVX512-BF16 or AMX-BF16)
    and a timed probe (one SmolLM2-sized matmul, bf16 against fp32, ~0.2 s) in which bf16 is at least
    PROBE_MIN_SPEEDUP times faster. `LORAKIT_CPU_BF16=1/0` decides instead. The verdict is cached in
    ``$LORAKIT_CACHE/cpu_bf16.json`` (default ``~/.cache/lorakit``), keyed by CPU model, flags, torch version
    and thread count; `refresh` probes again."""
    forced = env_flag("LORAKIT_CPU_BF16")
    if forced is not None:
        return forced
    flags = cpu_flags()
    if not flags & set(BF16_FLAGS):
        return False
    key = f"{cpu_model()}|{','.join(sorted(flags & set(BF16_FLAGS)))}|{torch.__version__}|{torch.get_num_threads()}"
    path = cache_root() / "cpu_bf16.json"
    cached: dict = {}
    with suppress(OSError, ValueError):  # a missing or garbled cache is probed again and rewritten
        cached = json.loads(path.read_text())
    cached = cached if isinstance(cached, dict) else {}
    if not refresh and isinstance(cached.get(key), dict) and "native" in cached[key]:
        return bool(cached[key]["native"])
    speedup = probe_bf16_speedup()
    cached[key] = {"native": speedup >= PROBE_MIN_SPEEDUP, "speedup": round(speedup, 3)}
    try:  # a cache that cannot be written only costs the probe next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=1))
        tmp.replace(path)
    except OSError:
        pass
    return cached[key]["native"]


def probe_bf16_speedup(reps: int = 5) -> float:
    """fp32 time / bf16 time of one (tokens x in) @ (in x out) matmul of PROBE_SHAPE, best of `reps` each."""
    n, k, m = PROBE_SHAPE
    g = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(n, k, generator=g), torch.randn(k, m, generator=g)
    a16, b16 = a32.bfloat16(), b32.bfloat16()

    def best(a: torch.Tensor, b: torch.Tensor) -> float:
        torch.mm(a, b)  # warm-up: first-call setup is not the steady rate
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(a32, b32) / best(a16, b16)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
    """The compute precision of a training forward pass: autocast to the base's 16-bit dtype (fp32 adapters then
    multiply in that dtype too, as PEFT's do under autocast), on a GPU and on the CPU; nothing in float32."""
    if dtype in (torch.bfloat16, torch.float16) and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=dtype)
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
