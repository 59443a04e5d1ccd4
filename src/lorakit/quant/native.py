"""The native NF4 kernels (`nf4_kernels.c`): built once per machine with its C compiler, called through ctypes.

Dequantizing NF4 with torch ops costs a gather from a 256-entry table per byte; on 2 CPU cores that ran at
about 0.3 G weights/s, so a 7B model spent seconds a step just unpacking weights, and every decoded token
unpacked all of them. The kernels do the same arithmetic (bit for bit: the tests compare them with the torch
path) at memory speed, and a `gemv_plan` multiplies a few input rows straight from the 4-bit codes, never
writing the weight out, which is what decoding needs. It has two routes: fp32 throughout, and, where the CPU has
AVX512-VNNI or AVX2 (the default there), an int8 route that rounds each input block to int8 and sums integer
products (`set_gemv_int8`, ``LORAKIT_GEMV=fp32``). It adds about 1 % to NF4's own error in a layer's output, and
with a software prefetch it took decoding on a 4-bit 7B base from 0.94x bitsandbytes' tokens/s to 1.38x on
AVX512-VNNI (docs/scale.md). Both int8 routes compute the same integer sums.

The library is compiled on first use with ``$CC`` (else ``cc``, ``gcc`` or ``clang``), ``-O3 -march=native``,
OpenMP where the compiler has it, and no floating-point contraction, into ``<lorakit cache>/kernels/`` under a
name that hashes the source, the compiler and the CPU's flags, so a machine with another CPU builds its own.
Anything that stops the build (no compiler, a failing compile) leaves a one-line warning and the torch path;
``LORAKIT_NATIVE=0`` turns the kernels off. Tensors on other devices always take the torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from lorakit.envflags import env_flag

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("nf4_kernels.c")
ENV = "LORAKIT_NATIVE"
GEMV_MAX_ROWS = 8  # input rows the kernel's matrix-vector product takes at once (its accumulators)

_lib: ctypes.CDLL | None = None
_tried = False
_lock = threading.Lock()
_P = ctypes.c_void_p
_I = ctypes.c_int64


class _Scales(ctypes.Structure):
    """The kernels' view of a layer's block scales: fp32 absmax, or the 8-bit codes of double quantization."""

    _fields_ = [
        ("absmax", _P),
        ("dq", _P),
        ("dynamic", _P),
        ("nested_scale", _P),
        ("nested", _I),
        ("offset", ctypes.c_float),
    ]


def scales(
    absmax: torch.Tensor, nested: tuple[torch.Tensor, torch.Tensor, int, float] | None = None
) -> _Scales:
    """absmax: fp32 per block; or, with `nested` = (dynamic map, nested scales, nested block size, offset), the
    uint8 codes of double quantization, decoded by the kernels block by block. The tensors must stay alive."""
    if nested is None:
        return _Scales(absmax.data_ptr(), None, None, None, 1, 0.0)
    dynamic, nested_scale, block, offset = nested
    return _Scales(None, absmax.data_ptr(), dynamic.data_ptr(), nested_scale.data_ptr(), block, offset)


_ENABLED = env_flag(ENV, True)


def set_enabled(enabled: bool) -> bool:
    """Use the kernels (True, the default unless ``LORAKIT_NATIVE=0``) or the torch ops; returns the old value."""
    global _ENABLED
    old, _ENABLED = _ENABLED, bool(enabled)
    return old


GEMV_ENV = "LORAKIT_GEMV"
_GEMV_INT8 = os.environ.get(GEMV_ENV, "int8").strip().lower() != "fp32"


def set_gemv_int8(enabled: bool) -> bool:
    """Decode through the int8 route where the kernels have one (`int8_route`: AVX512-VNNI or AVX2; True, the
    default unless ``LORAKIT_GEMV=fp32``), or the fp32 one everywhere; returns the old value. The int8 route
    rounds each input block of 64 to int8 against its absmax and each NF4 level to 1/127, as llama.cpp does with
    its 4-bit formats and bitsandbytes does with bf16 inputs; the fp32 route is exact up to the order of the
    sums."""
    global _GEMV_INT8
    old, _GEMV_INT8 = _GEMV_INT8, bool(enabled)
    return old


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them first if needed; None where they are off or cannot be had (the reason
    is logged once)."""
    global _lib, _tried
    if not _ENABLED:
        return None
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            try:
                _lib = _load()
            except (OSError, subprocess.SubprocessError) as exc:
                log.warning("NF4 native kernels unavailable, using torch ops: %s", str(exc).splitlines()[0])
            _tried = True
    return _lib


def simd() -> int:
    """The vector width the kernels were built for: 512 (AVX-512), 256 (AVX2 and FMA) or 0 (portable C loops,
    or no kernels)."""
    lib = library()
    return int(lib.lk_nf4_simd()) if lib is not None else 0


def vnni() -> bool:
    """True when the kernels were built with the AVX512-VNNI int8 route of the matrix-vector product."""
    lib = library()
    return bool(lib is not None and lib.lk_nf4_vnni())


def int8_route() -> bool:
    """True when the kernels have an int8 route for the matrix-vector product (AVX512-VNNI, or AVX2 and FMA)."""
    lib = library()
    return bool(lib is not None and lib.lk_nf4_q8())


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def kernel_path(root: Path | None = None) -> Path | None:
    """Where the kernels built from this source, by this compiler, for this CPU live in the cache ``root``
    (default: lorakit's cache); None without a C compiler."""
    from lorakit.envflags import cache_root

    cc = _compiler()
    if cc is None:
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + cc.encode() + _cpu_flags().encode()).hexdigest()[:16]
    return (root or cache_root()) / "kernels" / f"nf4-{key}.so"


def _load() -> ctypes.CDLL:
    target = kernel_path()
    if target is None:
        raise OSError("no C compiler (cc, gcc or clang) on PATH")
    cc = _compiler()
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            base = [
                cc,
                "-O3",
                "-march=native",
                "-ffp-contract=off",
                "-shared",
                "-fPIC",
                str(SOURCE),
                "-o",
                str(built),
            ]
            done = None
            for extra in (["-fopenmp"], []):  # OpenMP threads where the compiler has them
                done = subprocess.run(base + extra, capture_output=True, text=True, timeout=120)
                if done.returncode == 0:
                    break
            if done is None or done.returncode != 0:
                raise OSError(f"{cc} failed on {SOURCE.name}: {(done.stderr if done else '').strip()[:300]}")
            os.replace(built, target)  # atomic: a second process sees the whole file or none
    lib = ctypes.CDLL(str(target))
    lib.lk_nf4_simd.restype = ctypes.c_int
    lib.lk_nf4_dequant.argtypes = [_P, ctypes.POINTER(_Scales), _I, _I, _I, _P, ctypes.c_int, ctypes.c_int]
    lib.lk_nf4_dequant.restype = None
    lib.lk_nf4_quant.argtypes = [_P, _I, _I, _P, _P, ctypes.c_int]
    lib.lk_nf4_quant.restype = None
    lib.lk_dq8.argtypes = [_P, _I, _P, _P, _I, ctypes.c_float, _P]
    lib.lk_dq8.restype = None
    lib.lk_nf4_vnni.restype = ctypes.c_int
    lib.lk_nf4_q8.restype = ctypes.c_int
    lib.lk_nf4_gemv.argtypes = [
        _P,
        ctypes.POINTER(_Scales),
        _I,
        _I,
        _I,
        _P,
        _I,
        _P,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
    ]
    lib.lk_nf4_gemv.restype = ctypes.c_int
    return lib


def _usable(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    if not all(t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        return None
    return library()


Nested = tuple[
    torch.Tensor, torch.Tensor, int, float
]  # double quantization: dynamic map, scales, block, offset


def _scales_ok(absmax: torch.Tensor, nested: Nested | None) -> bool:
    if nested is None:
        return absmax.dtype == torch.float32
    dynamic, nested_scale, _, _ = nested
    return absmax.dtype == torch.uint8 and dynamic.dtype == nested_scale.dtype == torch.float32


def dequant_into(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    block_size: int,
    out: torch.Tensor,
    nested: Nested | None = None,
    first_block: int = 0,
) -> bool:
    """out (out.numel() values, fp32 or bf16) = level · absmax for the blocks from `first_block` on of the layer
    whose codes are `packed`; False (nothing written) where the kernels cannot do it: not on the CPU, another
    dtype, an odd block size, or no kernels. `absmax` is fp32, or with `nested` the 8-bit codes of double
    quantization (see `scales`)."""
    if out.dtype not in (torch.float32, torch.bfloat16) or block_size % 2 or not _scales_ok(absmax, nested):
        return False
    n_blocks = out.numel() // block_size
    if out.numel() % block_size or (first_block + n_blocks) * block_size > 2 * packed.numel():
        return False
    lib = _usable(packed, absmax, out, *(nested[:2] if nested else ()))
    if lib is None:
        return False
    sc = scales(absmax, nested)
    lib.lk_nf4_dequant(
        packed.data_ptr(),
        ctypes.byref(sc),
        first_block,
        n_blocks,
        block_size,
        out.data_ptr(),
        int(out.dtype == torch.bfloat16),
        torch.get_num_threads(),
    )
    return True


def quantize(w: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(packed codes, absmax) of `w` (any shape, fp32 values) as `nf4.quantize_4bit` computes them, or None
    where the kernels cannot do it."""
    flat = w.detach().reshape(-1)
    if flat.dtype != torch.float32 or block_size % 2 or flat.numel() % block_size:
        return None
    flat = flat.contiguous()
    lib = _usable(flat)
    if lib is None:
        return None
    packed = torch.empty(flat.numel() // 2, dtype=torch.uint8)
    absmax = torch.empty(flat.numel() // block_size, dtype=torch.float32)
    lib.lk_nf4_quant(
        flat.data_ptr(),
        absmax.numel(),
        block_size,
        packed.data_ptr(),
        absmax.data_ptr(),
        torch.get_num_threads(),
    )
    return packed, absmax


def dq8(
    codes: torch.Tensor, dynamic: torch.Tensor, scale: torch.Tensor, block: int, offset: float
) -> torch.Tensor | None:
    """dynamic[codes] · scale[i // block] + offset in fp32, or None where the kernels cannot do it."""
    lib = _usable(codes, dynamic, scale)
    if lib is None:
        return None
    out = torch.empty(codes.numel(), dtype=torch.float32)
    lib.lk_dq8(
        codes.data_ptr(), codes.numel(), dynamic.data_ptr(), scale.data_ptr(), block, offset, out.data_ptr()
    )
    return out


class GemvPlan:
    """One weight's matrix-vector product with everything but the input checked and converted once: decoding
    calls it hundreds of times a token (224 calls for a 7B model), so each microsecond of Python counts. It
    holds the tensors it points at, so none can be freed while it lives."""

    __slots__ = ("_fn", "_head", "_keep", "rows")

    def __init__(self, lib: ctypes.CDLL, packed, absmax, rows: int, cols: int, block_size: int, nested):
        sc = scales(absmax, nested)
        self._keep = (packed, absmax, nested, sc)
        self._fn = lib.lk_nf4_gemv
        self._head = (packed.data_ptr(), ctypes.byref(sc), rows, cols, block_size)
        self.rows = rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """x (T ≤ GEMV_MAX_ROWS, cols), fp32 or bf16 on the CPU (the caller checks) -> (T, rows) in x's dtype;
        None where the kernels are now off or could not allocate."""
        if not _ENABLED:
            return None
        x = x.contiguous()
        t = x.shape[0]
        y = torch.empty(t, self.rows, dtype=x.dtype)
        bf16 = x.dtype == torch.bfloat16
        if not self._fn(
            *self._head, x.data_ptr(), t, y.data_ptr(), bf16, torch.get_num_threads(), _GEMV_INT8
        ):
            return None
        return y


def gemv_plan(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    rows: int,
    cols: int,
    block_size: int,
    nested: Nested | None = None,
) -> GemvPlan | None:
    """The plan of x · dequant(W)ᵀ for a weight of `rows` x `cols`; None where the kernels cannot do it (then
    dequantize and multiply). `absmax` and `nested` as for `dequant_into`."""
    if block_size % 2 or cols % block_size or not _scales_ok(absmax, nested):
        return None
    lib = _usable(packed, absmax, *(nested[:2] if nested else ()))
    return None if lib is None else GemvPlan(lib, packed, absmax, rows, cols, block_size, nested)
