"""Load a model straight into 4 bits: the full-precision model never exists in memory at once.

`quantize` after a normal load touches every full-precision weight, and with transformers' memory-mapped
safetensors those pages stay resident as long as any tensor of the file is alive: quantizing SmolLM2-135M that
way ends at 0.87 GB RSS for a 0.16 GB model. `load_quantized` builds the model's skeleton with uninitialised
storage (never touched, so never resident), reads each linear weight from the safetensors file with plain reads
(no mapping) just before quantizing it, then reads the remaining tensors into place. The peak is the 4-bit
model plus the full-precision rest (embeddings, norms, the head) plus one layer.

It handles folders whose safetensors tensor names equal the model's state-dict names (what `save_pretrained`
writes, and lorakit's GGUF cache). Anything else (renamed or fused checkpoint keys, `.bin` files) falls back to
a normal load followed by `quantize`, with a log line saying so.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import struct
import time
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import ModelLoadError
from lorakit.quant.apply import QuantReport, quantize
from lorakit.quant.nf4 import BLOCK_SIZE, NF4Linear

log = logging.getLogger(__name__)

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


MEMORY_ENV = (
    "LORAKIT_MEMORY_LIMIT"  # GB lorakit may plan a load for (default: the machine's available memory)
)


def available_bytes() -> int | None:
    """Memory a load may use: ``$LORAKIT_MEMORY_LIMIT`` (GB) if set, else Linux's MemAvailable, else None."""
    limit = os.environ.get(MEMORY_ENV)
    if limit:
        try:
            return int(float(limit) * 1e9)
        except ValueError as exc:
            raise ModelLoadError(f"{MEMORY_ENV}={limit!r} is not a number of GB") from exc
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class TensorIndex:
    """Where each tensor of a folder's safetensors file(s) lies, read with plain file reads."""

    def __init__(self, entries: dict[str, tuple[Path, torch.dtype, list[int], int, int]]) -> None:
        self.entries = entries  # name -> (file, dtype, shape, absolute start, end)

    @classmethod
    def of_folder(cls, folder: Path) -> TensorIndex | None:
        """The index of `model.safetensors` or a sharded `model.safetensors.index.json`; None if neither."""
        single, sharded = folder / "model.safetensors", folder / "model.safetensors.index.json"
        if single.is_file():
            files = [single]
        elif sharded.is_file():
            weight_map = json.loads(sharded.read_text()).get("weight_map", {})
            files = sorted({folder / f for f in weight_map.values()})
        else:
            return None
        entries: dict[str, tuple[Path, torch.dtype, list[int], int, int]] = {}
        for file in files:
            if not file.is_file():
                raise ModelLoadError(f"{file}: shard named by {sharded.name} is missing")
            size = file.stat().st_size
            try:
                with open(file, "rb") as f:
                    (n,) = struct.unpack("<Q", f.read(8))
                    if n > size - 8:
                        raise ValueError(f"header of {n} bytes in a {size}-byte file")
                    header = json.loads(f.read(n))
                items = [(k, v) for k, v in header.items() if k != "__metadata__"]
                spans = [(k, v["dtype"], v["shape"], *v["data_offsets"]) for k, v in items]
            except (struct.error, ValueError, TypeError, KeyError, AttributeError) as exc:
                raise ModelLoadError(f"{file}: not a safetensors file ({_first_line(exc)})") from exc
            for name, kind, shape, start, end in spans:
                dtype = _DTYPES.get(kind)
                if dtype is None:
                    return None
                if 8 + n + end > size:
                    raise ModelLoadError(
                        f"{file}: truncated: tensor {name!r} ends at byte {8 + n + end:,}, the file has {size:,}"
                    )
                entries[name] = (file, dtype, shape, 8 + n + start, 8 + n + end)
        return cls(entries)

    def numel(self, name: str) -> int:
        return math.prod(self.entries[name][2])

    def mapped(self, name: str) -> torch.Tensor:
        """The tensor `name` as stored, memory-mapped copy-on-write: only the pages that are read become
        resident, and a write changes this process's copy, never the file."""
        file, stored, shape, start, end = self.entries[name]
        with open(file, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if end == start:
            return torch.empty(shape, dtype=stored)
        return (
            torch.frombuffer(mm, dtype=torch.uint8, count=end - start, offset=start).view(stored).view(shape)
        )

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `name`, in `dtype` if given; read into fresh memory (no mapping of the file)."""
        file, stored, shape, start, end = self.entries[name]
        buf = torch.empty(end - start, dtype=torch.uint8)
        with open(file, "rb") as f:
            f.seek(start)
            if f.readinto(memoryview(buf.numpy())) != end - start:
                raise ModelLoadError(f"{file}: truncated while reading tensor {name!r}")
        t = buf.view(stored).reshape(shape)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)


def load_quantized(
    spec: str | os.PathLike | None = None,
    *,
    method: str = "nf4",
    double_quant: bool = True,
    skip: tuple[str, ...] | list[str] = ("lm_head",),
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    num_labels: int | None = None,
    per_token: bool = False,
    bare: bool = False,
) -> tuple[nn.Module, object, QuantReport]:
    """`(model, tokenizer, report)`: `lorakit.load_model(spec)` followed by `lorakit.quantize(model, ...)`, with
    the same result (tested bit for bit) but without the full-precision model ever in memory. With `device`
    (a GPU), each linear weight goes there alone and is quantized there, then the rest of the model follows: no
    full-precision copy of the linear layers exists on the GPU or the CPU.

    `num_labels`: a sequence classifier (`load_model`'s), loaded in full precision and then quantized (its head
    is new, which the 4-bit load's skeleton cannot take from the checkpoint; `per_token`: a token classifier);
    the head stays in `dtype`. `bare`: the model without a head (an embedding model's), loaded so too."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    from lorakit.device import resolve_device
    from lorakit.models import _dtype_kwargs, _ensure_pad_token, _one_line, load_model, resolve_model_dir

    target = None if device is None else resolve_device(device)  # a missing GPU fails before the load
    folder = resolve_model_dir(spec, cache_dir)
    if num_labels is not None or bare:
        model, tokenizer = load_model(
            folder, dtype=dtype, num_labels=num_labels, per_token=per_token, bare=bare
        )
        report = quantize(model, method, double_quant, skip)  # the head is never quantized
        return _moved(model, target), tokenizer, report
    index = TensorIndex.of_folder(folder)
    model = None
    if index is not None:
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
            with no_init_weights():
                model = AutoModelForCausalLM.from_config(config, **_dtype_kwargs(dtype))
            model.tie_weights()  # from_pretrained ties the head to the embedding; from_config may not yet
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
            raise ModelLoadError(f"cannot build the model of {str(folder)!r}: {_one_line(exc)}") from exc
        missing = _unmatched(model, index)
        if missing:
            log.warning(
                "%s: checkpoint names differ from the model's (e.g. %r); loading in full precision, then quantizing",
                folder,
                missing[0],
            )
            model = None
    if model is None:
        model, tokenizer = load_model(folder, dtype=dtype)
        report = quantize(model, method, double_quant, skip)
        return _moved(model, target), tokenizer, report
    on_gpu = target is not None and target.type != "cpu"  # each weight quantized where it will run
    need = estimate_bytes(model, index, dtype, double_quant, skip)
    have = available_bytes()
    if not on_gpu and have is not None and need > have:
        raise ModelLoadError(
            f"{folder}: loading it in 4 bits needs about {need / 1e9:.2f} GB, and {have / 1e9:.2f} GB is available"
            f"{f' (${MEMORY_ENV})' if os.environ.get(MEMORY_ENV) else ''}"
        )
    start = time.perf_counter()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}

    def source(name: str) -> torch.Tensor:
        value = index.read(name, dtype)
        if tuple(value.shape) != shapes[name]:
            raise ModelLoadError(
                f"tensor {name!r} has shape {tuple(value.shape)} in the checkpoint, the model's config wants "
                f"{shapes[name]}"
            )
        return value.to(target) if on_gpu else value

    report = quantize(model, method, double_quant, skip, source=source)
    _fill(model, index, dtype, map_embedding=not on_gpu)
    log.info(
        "loaded %s in 4 bits in %.1f s (estimated %.2f GB: %s)",
        folder,
        time.perf_counter() - start,
        need / 1e9,
        report.summary(),
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer in {str(folder)!r}: {_one_line(exc)}") from exc
    _ensure_pad_token(model, tokenizer)
    return _moved(model, target).eval(), tokenizer, report


def _moved(model: nn.Module, device: torch.device | None) -> nn.Module:
    return model.to(device) if device is not None and device.type != "cpu" else model


def _groups(model: nn.Module) -> list[list[str]]:
    """State-dict names grouped by the tensor they name (tied weights share a group)."""
    by_id: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(t), []).append(name)
    return list(by_id.values())


def _unmatched(model: nn.Module, index: TensorIndex) -> list[str]:
    """Model tensors of which no name is in the checkpoint, and checkpoint tensors the model lacks."""
    groups = _groups(model)
    names = {n for g in groups for n in g}
    return [g[0] for g in groups if not any(n in index for n in g)] + [
        n for n in index.entries if n not in names
    ]


def estimate_bytes(model: nn.Module, index: TensorIndex, dtype: torch.dtype, double_quant: bool, skip) -> int:
    """Bytes of the loaded model: the linear layers `quantize` will take at NF4's bits per weight, the rest in
    `dtype` (a tied tensor once), plus the largest single weight, which is read in full precision before it is
    quantized. An estimate made from the model's skeleton before any weight is read."""
    from lorakit.quant.apply import _reason_to_skip, _shared_weights

    bits = 4 + 8 / 64 + 32 / (64 * 256) if double_quant else 4.5
    size = 1 if dtype == torch.bool else torch.empty((), dtype=dtype).element_size()
    shared = _shared_weights(model)
    four_bit = {
        f"{name}.weight"
        for name, m in model.named_modules()
        if type(m) is nn.Linear and _reason_to_skip(name, m, skip, BLOCK_SIZE, shared) is None
    }
    total = largest = 0
    for name, p in model.named_parameters():  # tied parameters are listed once
        if name in four_bit:
            total += math.ceil(p.numel() * bits / 8)
            largest = max(largest, p.numel() * size)
        else:
            total += p.numel() * size
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    return total + largest


@torch.no_grad()
def _fill(model: nn.Module, index: TensorIndex, dtype: torch.dtype, map_embedding: bool = True) -> None:
    """Read every tensor that quantization did not already consume into the model. The input embedding, when
    it is stored in `dtype` and is not tied to the output head, stays memory-mapped from the file: a batch
    touches only the rows it looks up, so only those become resident (7B: 0.4 GB not read)."""
    quant_buffers = {
        f"{prefix}.{b}" if prefix else b
        for prefix, m in model.named_modules()
        if isinstance(m, NF4Linear)
        for b, _ in m.named_buffers(recurse=False)
    }
    tensors = model.state_dict(keep_vars=True)
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is embedding:
        embedding = None  # tied: the head reads every row each step
    for group in _groups(model):
        if group[0] in quant_buffers:
            continue
        name = next(n for n in group if n in index)
        target = tensors[group[0]]
        stored = index.entries[name][1]
        if map_embedding and target is embedding and stored == dtype:
            value = index.mapped(name)
        else:
            value = index.read(name, dtype if target.is_floating_point() else None)
        if tuple(value.shape) != tuple(target.shape):
            raise ModelLoadError(
                f"tensor {name!r} has shape {tuple(value.shape)} in the checkpoint, the model wants "
                f"{tuple(target.shape)}"
            )
        target.data = value
