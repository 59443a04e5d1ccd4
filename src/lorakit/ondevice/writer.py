"""Writing GGUF files: tensor encodings (f32, f16, bf16, q8_0), key-value entries, one atomic file.

Vectors (norms, biases) stay f32, as llama.cpp's converter keeps them. A q8_0 tensor whose rows are not a
multiple of its 32-value blocks (a LoRA B of rank 16, say) is written as f16 instead, as the converter does.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tqdm import tqdm

from lorakit.atomic import atomic_write
from lorakit.errors import AdapterFileError, OutputError

log = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
OUTTYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}


def check_outtype(outtype: str) -> str:
    if outtype not in OUTTYPES:
        raise OutputError(f"GGUF tensor type {outtype!r} is not one lorakit writes: {', '.join(OUTTYPES)}")
    return outtype


def encode(t: torch.Tensor, outtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A tensor as the array GGUFWriter stores, and its GGML type."""
    x = t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    qtype, _ = encoded_type(x.shape, outtype)
    if qtype == Q.F32:
        return x, Q.F32
    if qtype == Q.F16:
        return x.astype(np.float16), Q.F16
    return gguf.quants.quantize(x, qtype), qtype


def decode(tensor: Any) -> torch.Tensor:
    """A GGUFReader tensor as fp32 in numpy's (row-major, reversed-ne) shape."""
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(np.array(data, dtype=np.float32))  # a copy: the reader maps the file read-only


@dataclass
class Entry:
    key: str
    value: Any
    vtype: gguf.GGUFValueType
    sub_type: gguf.GGUFValueType | None = None


def encoded_type(shape: tuple[int, ...], outtype: str) -> tuple[gguf.GGMLQuantizationType, int]:
    """(the GGML type `encode` picks for a tensor of `shape`, its size in bytes), without encoding it."""
    qtype = OUTTYPES[outtype][0]
    if len(shape) < 2:
        qtype = Q.F32
    elif qtype == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        qtype = Q.F16
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return qtype, math.prod(shape) // block * size


@dataclass
class GgufFile:
    """What one GGUF file holds before it is written: its architecture, key-value entries and tensors. Tensors
    are kept as they are (a model's own weights, not copies) and encoded one at a time while the file is
    written, so that writing a model costs one tensor's worth of memory beyond the model."""

    arch: str
    entries: list[Entry] = field(default_factory=list)
    tensors: list[tuple[str, tuple[int, ...], Callable[[], torch.Tensor], str]] = field(default_factory=list)

    def add(self, key: str, value: Any, vtype: gguf.GGUFValueType, sub_type=None) -> None:
        self.entries = [e for e in self.entries if e.key != key] + [Entry(key, value, vtype, sub_type)]

    def add_tensor(
        self,
        name: str,
        t: torch.Tensor,
        outtype: str,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """Add tensor `name`: `t`, or `transform(t)` (computed when written; it must keep the shape)."""
        make = (lambda: t) if transform is None else (lambda: transform(t))
        self.tensors.append((name, tuple(t.shape), make, outtype))

    def write(self, path: str | os.PathLike, *, progress: bool = False) -> Path:
        """Write the file atomically: a failure leaves any earlier file at `path` as it was. `progress`: a bar on
        stderr (for the CLI)."""
        path = Path(path)
        check_parent(path)

        def write(tmp: Path) -> None:
            w = gguf.GGUFWriter(tmp, self.arch)
            for e in self.entries:
                if e.key != gguf.Keys.General.ARCHITECTURE:
                    w.add_key_value(e.key, e.value, e.vtype, sub_type=e.sub_type)
            for name, shape, _, outtype in self.tensors:
                qtype, nbytes = encoded_type(shape, outtype)
                w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for _, _, make, outtype in tqdm(
                self.tensors, desc="writing", unit="tensor", disable=not progress
            ):
                data, _ = encode(make(), outtype)
                w.write_tensor_data(data)
            w.close()

        atomic_write(path, write)
        log.info("wrote %s (%d tensors)", path, len(self.tensors))
        return path


def check_parent(path: Path) -> None:
    """OutputError unless `path`'s folder exists and `path` is not a folder."""
    if not path.parent.is_dir():
        raise OutputError(f"{path}: the folder {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give the path of a .gguf file to write")


def copy_entries(reader: gguf.GGUFReader, skip: Iterable[str] = ()) -> list[Entry]:
    """A GGUF file's key-value entries (not the GGUF.* header fields, not `skip`), to write into another."""
    out = []
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        vtype = f.types[0]
        sub = f.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(f.types) > 1 else None
        out.append(Entry(key, f.contents(), vtype, sub))
    return out


def open_gguf(path: str | os.PathLike, error: type[Exception] = AdapterFileError) -> gguf.GGUFReader:
    """A reader of GGUF file `path`; `error`, in one line, if it is missing or not a readable GGUF."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError, TypeError) as e:
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise error(f"{path}: not a readable GGUF file ({reason})") from None


def read_field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()
