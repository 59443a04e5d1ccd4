"""Dropout masks for the fused LoRA path: counter-based, drawn on every thread, cheap scratch space.

`dropout_keep(seed, shape, p)` is a pure function of (seed, position): splitmix64 of a counter, four 16-bit draws
per 64-bit output, so the same seed gives the same mask on any call. `dropout_scale(p)` is the matching unbiased
scale. `lorakit.fused` keeps the mask (1 byte an entry) for backward.
"""

from __future__ import annotations

import threading

import torch

# Dropout masks come from splitmix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number generators",
# OOPSLA 2014) applied to a counter: output i is mix(seed + i·γ), and each 64-bit output gives four 16-bit draws.
# It is elementwise integer ops that run on every thread, about 4× faster on CPU than torch's bernoulli_ (a serial
# mt19937 stream), and the mask is a pure function of (seed, position). torch has no logical right shift for
# int64, so each arithmetic shift is masked to its low bits; the outputs equal the reference algorithm's (tested).
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_ROUNDS = ((30, 34, _MIX1), (27, 37, _MIX2), (31, 33, None))  # (shift, bits kept after it, multiplier)


class _Workspace(threading.local):
    """Per-thread scratch buffers for the dropout path, grown to the largest size seen and sliced: a training step
    draws a mask and masks the input twice per adapted layer, and fresh temporaries of that size cost page faults
    on every step. They stay allocated (6 bytes per entry of the largest adapted input, plus one dropped
    copy of it) for the life of the thread."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (name, dtype, device)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = self.buffers[key] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n]

    def counters(self, count: int, device: torch.device) -> torch.Tensor:
        """i·γ for i = 1..count (a prefix of a longer table is the same table)."""
        key = ("counters", torch.int64, device)
        table = self.buffers.get(key)
        if table is None or table.numel() < count:
            table = torch.arange(1, count + 1, dtype=torch.int64, device=device).mul_(_GOLDEN)
            self.buffers[key] = table
        return table[:count]


_WORKSPACE = _Workspace()


def _splitmix64_into(seed: int, count: int, device: torch.device) -> torch.Tensor:
    """splitmix64 outputs 1..count in a workspace buffer (valid until the next call on this thread)."""
    z = torch.add(
        _WORKSPACE.counters(count, device), seed, out=_WORKSPACE.get("z", count, torch.int64, device)
    )
    tmp = _WORKSPACE.get("shifted", count, torch.int64, device)
    for shift, bits, mult in _ROUNDS:
        torch.bitwise_right_shift(z, shift, out=tmp).bitwise_and_((1 << bits) - 1)
        z.bitwise_xor_(tmp)
        if mult is not None:
            z.mul_(mult)
    return z


def splitmix64(seed: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Outputs 1..count of splitmix64 seeded with `seed` (int64 tensor holding the unsigned 64-bit values)."""
    return _splitmix64_into(seed, count, torch.device(device)).clone()


def _cut(p: float) -> int:
    return round(p * 65536)  # a draw (a 16-bit field as int16, plus 32768) below the cut drops the entry


def dropout_scale(p: float) -> float:
    """1/(1 - p) for p rounded as `dropout_keep` rounds it, so kept·scale is unbiased."""
    return 65536.0 / (65536 - _cut(p))


def dropout_keep(seed: int, shape: torch.Size, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """The keep mask (bool, `shape`): each entry is kept with probability 1 - p, p rounded to 1/65536; the same
    (seed, shape, p) give the same mask. Scale kept entries by `dropout_scale(p)`."""
    n = shape.numel()
    draws = _splitmix64_into(seed, (n + 3) // 4, torch.device(device)).view(torch.int16)[:n]
    return draws.ge(_cut(p) - 32768).view(shape)


def scratch(like: torch.Tensor) -> torch.Tensor:
    """A per-thread buffer shaped like `like` for a product consumed at once (valid until the next call)."""
    return _WORKSPACE.get("dropped", like.numel(), like.dtype, like.device).view(like.shape)


def dropped(x2: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x ⊙ keep (unscaled) in the scratch buffer: consumed by the next matmul, never saved."""
    return torch.mul(x2, keep, out=scratch(x2))
