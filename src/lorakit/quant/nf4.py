"""NF4 4-bit weights with double quantization (QLoRA, Dettmers et al. 2023), in plain PyTorch (any device).

The layout is bitsandbytes' `quantize_4bit(quant_type="nf4", blocksize=64)`, bit for bit on the same input:

- the weight, flattened row-major, is cut into blocks of 64 values; each block is divided by its absmax and every
  value rounded to the nearest of the 16 NF4 levels (`NF4_CODE`; ties go to the lower level);
- two 4-bit indices per byte, the first value of each pair in the high nibble;
- double quantization: the fp32 absmax constants minus their mean are stored as 8-bit indices into bitsandbytes'
  signed dynamic map (`dynamic_map`), in blocks of 256 with one fp32 absmax each, rounded through the
  65,536-point lookup grid of bitsandbytes' CPU kernel (see `quantize_8bit`).

Storage per weight: 4 bits + 8/64 (8-bit absmax) + 32/(64·256) (its fp32 scale) ≈ 4.127 bits; 4.5 bits without
double quantization (fp32 absmax per 64 weights). The lookup tables are shared, not stored per layer.
"""

from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.quant import native

BLOCK_SIZE = 64
NESTED_BLOCK_SIZE = 256
_GRID = 65536  # points of the lookup grid of the 8-bit quantizer

# bitsandbytes' NF4 levels (create_normal_map(offset=0.9677083)): normal quantiles normalised to [-1, 1],
# 8 positive and 7 negative levels and an exact zero.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

_tables: dict[tuple[str, torch.device], torch.Tensor] = {}


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # NF4Linear -> (its buffers, its GemvPlan)
_GEMV_DTYPES = (torch.float32, torch.bfloat16)


def _table(kind: str, device: torch.device) -> torch.Tensor:
    key = (kind, torch.device(device))
    t = _tables.get(key)
    if t is None:
        if kind == "code":
            t = torch.tensor(NF4_CODE, dtype=torch.float32)
        elif kind == "bounds":  # midpoints between neighbouring levels
            c = torch.tensor(NF4_CODE, dtype=torch.float32)
            t = (c[:-1] + c[1:]) / 2
        elif kind == "pairs":  # byte -> (level of the high nibble, level of the low nibble)
            c = torch.tensor(NF4_CODE, dtype=torch.float32)
            b = torch.arange(256)
            t = torch.stack([c[b >> 4], c[b & 15]], dim=1).contiguous()
        elif kind == "dynamic":
            t = dynamic_map()
        else:  # "grid": grid point i of [-1, 1] -> nearest dynamic level (bitsandbytes' CPU lookup table)
            code = dynamic_map()
            mid = 0.5 * (code[:-1] + code[1:])
            points = -1.0 + (2.0 * torch.arange(_GRID, dtype=torch.float32)) / (_GRID - 1)
            t = torch.searchsorted(mid, points).to(torch.uint8)
        t = _tables[key] = t.to(key[1])
    return t


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True, max_exponent_bits=7,
    total_bits=8)`): 256 sorted fp32 levels in [-0.99297, 1], a dynamic exponent and a shrinking fraction."""
    data: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-6 + i)
        data += (scale * means).tolist()
        data += (-scale * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


def _check_size(n: int, block_size: int) -> None:
    if block_size < 2 or block_size % 2 or n % block_size:
        raise ValueError(f"{n} values cannot be cut into blocks of {block_size} (need a multiple of it)")


@torch.no_grad()
def quantize_4bit(w: torch.Tensor, block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4-quantize `w` (any shape, numel a multiple of `block_size`).

    Returns (packed uint8 (numel/2,), absmax fp32 (numel/block_size,)). Arithmetic in fp32 as bitsandbytes does:
    scaled = clamp(w · (1/absmax), -1, 1), then the index of the nearest level by its midpoints.
    """
    flat = w.detach().reshape(-1).float()
    _check_size(flat.numel(), block_size)
    fast = native.quantize(flat, block_size)
    if fast is not None:
        return fast
    blocks = flat.view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1, 1)
    idx = torch.bucketize(scaled, _table("bounds", flat.device), out_int32=True).to(torch.uint8).view(-1)
    return (idx[0::2] << 4) | idx[1::2], absmax


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype = torch.float32,
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """The weight of `shape` in `dtype`: level · absmax per block, computed in fp32 and then cast (by the native
    kernels on the CPU, with the same result)."""
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    if native.dequant_into(packed.reshape(-1), absmax, block_size, out):
        return out
    pairs = _table("pairs", packed.device).index_select(0, packed.reshape(-1).to(torch.int32))  # (n/2, 2)
    w = pairs.view(-1, block_size).mul_(absmax.float().unsqueeze(1))
    return w.view(shape).to(dtype)


@torch.no_grad()
def quantize_8bit(x: torch.Tensor, block_size: int = NESTED_BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization of a 1-D tensor with the dynamic map, as bitsandbytes' CPU kernel
    (`quantize_blockwise`, 0.50) does it: v = clamp(x · (1/absmax), -1, 1) goes to a grid of 65,536 points,
    i = trunc((v + 1)·0.5·65535 + 0.5), and a table gives the level nearest to grid point i. That is the nearest
    level except within ~1.5e-5 (in units of the block's absmax) of a midpoint. The last block may be partial;
    an all-zero block gets index 0. Returns (uint8 codes (n,), absmax fp32 (ceil(n/block_size),))."""
    n = x.numel()
    blocks = F.pad(x.reshape(-1).float(), (0, -n % block_size)).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    v = (blocks * inv.unsqueeze(1)).clamp_(-1, 1)
    grid = ((v + 1.0) * 0.5 * (_GRID - 1) + 0.5).to(torch.int64)
    idx = _table("grid", x.device)[grid].masked_fill_((absmax == 0).unsqueeze(1), 0)
    return idx.view(-1)[:n], absmax


def dequantize_8bit(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    block_size: int = NESTED_BLOCK_SIZE,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 values of `quantize_8bit`'s codes: level · absmax of the block (+ `offset`, added after rounding)."""
    n = codes.numel()
    if codes.dtype == torch.uint8 and absmax.dtype == torch.float32 and offset is not None:
        fast = native.dq8(
            codes.reshape(-1), _table("dynamic", codes.device), absmax, block_size, float(offset)
        )
        if fast is not None:
            return fast
    vals = _table("dynamic", codes.device)[codes.reshape(-1).long()]
    vals = F.pad(vals, (0, -n % block_size)).view(-1, block_size) * absmax.unsqueeze(1)
    vals = vals.view(-1)[:n]
    return vals if offset is None else vals + offset


_scratch = threading.local()


def _buffer(dtype: torch.dtype, n: int) -> torch.Tensor:
    """n elements of this thread's reused scratch buffer of `dtype` (valid until the next call in this thread)."""
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < n:
        buf = bufs[dtype] = torch.empty(n, dtype=dtype)
    return buf[:n]


def _kernels_for(layer: NF4Linear, dtype: torch.dtype) -> bool:
    return (
        layer.qweight.device.type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and native.library() is not None
    )


def _rows(layer: NF4Linear, dtype: torch.dtype, first: int, last: int) -> torch.Tensor | None:
    """Rows [first, last) of the weight in `dtype`, dequantized by the kernels into the scratch buffer; None
    where they cannot."""
    out = _buffer(dtype, (last - first) * layer.in_features).view(last - first, layer.in_features)
    absmax, nested = layer.kernel_scales()
    block = first * layer.in_features // layer.block_size
    return out if native.dequant_into(layer.qweight, absmax, layer.block_size, out, nested, block) else None


def scratch_weight(layer: NF4Linear, dtype: torch.dtype) -> torch.Tensor:
    """`layer`'s whole weight in `dtype`, dequantized by the native kernels into a buffer that this thread reuses
    for every layer (so a step allocates, and page-faults, no weight-sized memory); a fresh tensor where the
    kernels do not apply. The result is only valid until the next call in this thread: use it at once."""
    if _kernels_for(layer, dtype):
        w = _rows(layer, dtype, 0, layer.out_features)
        if w is not None:
            return w
    return layer.dequantize(dtype)


class _DequantLinear(torch.autograd.Function):
    """y = x·Wᵀ with W dequantized on the fly; W is not saved for backward but dequantized again there, so no
    full-precision copy lives between the passes. Gradients flow to x only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, scratch_weight(layer, x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ scratch_weight(ctx.layer, grad.dtype), None


class NF4Linear(nn.Module):
    """A frozen linear layer with an NF4 weight: y = x·dequant(W)ᵀ + b, W dequantized into x's dtype each call.

    Buffers (nothing full-precision is kept for W): `qweight` uint8 (out·in/2,) with two indices per byte;
    `absmax` fp32 (out·in/64,), or, with double quantization, `absmax` uint8 plus `absmax_scale` fp32
    (blocks/256,) and `absmax_offset` fp32 (). The bias, if any, stays a full-precision parameter.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: nn.Parameter | None = None,
        weight_dtype: torch.dtype = torch.float32,
        double_quant: bool = True,
        block_size: int = BLOCK_SIZE,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        n = in_features * out_features
        _check_size(n, block_size)
        self.in_features, self.out_features = in_features, out_features
        self.weight_dtype, self.double_quant, self.block_size = weight_dtype, double_quant, block_size
        blocks = n // block_size
        self.register_buffer("qweight", torch.zeros(n // 2, dtype=torch.uint8, device=device))
        if double_quant:
            nested = -(-blocks // NESTED_BLOCK_SIZE)
            self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.uint8, device=device))
            self.register_buffer("absmax_scale", torch.zeros(nested, dtype=torch.float32, device=device))
            self.register_buffer("absmax_offset", torch.zeros((), dtype=torch.float32, device=device))
        else:
            self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.float32, device=device))
        self.bias = bias

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls, linear: nn.Linear, *, double_quant: bool = True, block_size: int = BLOCK_SIZE
    ) -> NF4Linear:
        """Quantize `linear`'s weight; the bias parameter is reused as it is."""
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias,
            weight_dtype=w.dtype,
            double_quant=double_quant,
            block_size=block_size,
            device=w.device,
        )
        packed, absmax = quantize_4bit(w, block_size)
        layer.qweight.copy_(packed)
        if double_quant:
            offset = absmax.mean()
            codes, scale = quantize_8bit(absmax - offset)
            layer.absmax.copy_(codes)
            layer.absmax_scale.copy_(scale)
            layer.absmax_offset.copy_(offset)
        else:
            layer.absmax.copy_(absmax)
        return layer

    def absmax_fp32(self) -> torch.Tensor:
        """The per-block scales (blocks,) in fp32 (decoded from 8 bits with double quantization)."""
        if not self.double_quant:
            return self.absmax
        return dequantize_8bit(self.absmax, self.absmax_scale, offset=self.absmax_offset)

    def kernel_scales(self) -> tuple[torch.Tensor, native.Nested | None]:
        """(absmax, nested) as the native kernels take them: the 8-bit codes are decoded inside the kernels."""
        if not self.double_quant:
            return self.absmax, None
        dynamic = _table("dynamic", self.absmax.device)
        return self.absmax, (dynamic, self.absmax_scale, NESTED_BLOCK_SIZE, float(self.absmax_offset))

    def _gemv_plan(self) -> native.GemvPlan | None:
        """The native matrix-vector product of this weight, kept while the buffers stay the same tensor objects,
        unmodified (their version counters): decoding asks for it hundreds of times a token, and
        `float(absmax_offset)` alone is a tensor read each time. Plans live outside the module (`_PLANS`), so
        that copying or pickling a layer never meets their ctypes struct; `_apply` drops this layer's plan."""
        now = [b for b in self._buffers.values() if b is not None]
        kept = _PLANS.get(self)
        if (
            kept is not None
            and len(kept[0]) == len(now)
            and all(a is b and a._version == v for (a, v), b in zip(kept[0], now, strict=True))
        ):
            return kept[1]
        absmax, nested = self.kernel_scales()
        plan = native.gemv_plan(
            self.qweight, absmax, self.out_features, self.in_features, self.block_size, nested
        )
        if plan is not None:
            _PLANS[self] = ([(b, b._version) for b in now], plan)
        return plan

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight (out_features, in_features) in `dtype` (default: the original weight's dtype)."""
        shape = (self.out_features, self.in_features)
        return dequantize_4bit(
            self.qweight, self.absmax_fp32(), shape, dtype or self.weight_dtype, self.block_size
        )

    def _apply(self, fn, recurse: bool = True):
        """`.to(device)` moves the buffers; a dtype cast (`model.to(torch.bfloat16)`, `.half()`) changes the
        compute dtype (and the bias) but leaves the fp32 block constants as they are."""
        consts = {n: b for n, b in self._buffers.items() if b is not None and b.is_floating_point()}
        _PLANS.pop(self, None)  # it would hold the old buffers
        super()._apply(fn, recurse)
        for n, old in consts.items():
            new = self._buffers[n]
            if new.dtype != old.dtype:
                self.weight_dtype = new.dtype
                self._buffers[n] = old.to(new.device)
        return self

    def storage_bytes(self) -> int:
        """Bytes of the buffers that encode the weight (codes and block constants; not the bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        bias = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        if x.requires_grad and torch.is_grad_enabled():
            y = _DequantLinear.apply(x, self)
            return y if bias is None else y + bias
        if (
            x.numel() <= native.GEMV_MAX_ROWS * self.in_features
            and x.device.type == "cpu"
            and x.dtype in _GEMV_DTYPES
        ):
            # decoding: a few rows multiply straight from the 4-bit codes (the weight is never written out)
            plan = self._gemv_plan()
            y = None if plan is None else plan(x.reshape(-1, self.in_features))
            if y is not None:
                y = y.view(*x.shape[:-1], self.out_features)
                return y if bias is None else y + bias
        return F.linear(x, scratch_weight(self, x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"nf4, block_size={self.block_size}, double_quant={self.double_quant}, dtype={self.weight_dtype}"
        )
