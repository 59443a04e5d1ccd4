"""The arithmetic of `lorakit.combine` on one module: each source's LoRA there as ΔW_i = s_i·B_i·A_i, and the
methods that combine them into the new factors A, B (the method table is `lorakit.combine`'s docstring)."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from lorakit.errors import AdapterError


@dataclass(frozen=True)
class Lora:
    """One source's LoRA on one module: A (r, fan_in[, *kernel]), B (out, r[, 1, …]), scaling s."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    embedding: bool

    @property
    def r(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """ΔW's shape as the file defines it: (out, fan_in[, *kernel])."""
        return (self.B.shape[0], *self.A.shape[1:])

    def delta(self) -> torch.Tensor:
        """s·B·A as an (out, fan_in) float64 matrix."""
        return (self.B.flatten(1).double() @ self.A.flatten(1).double()) * self.scaling


Parts = list[tuple[str, float, "Lora | None"]]  # (source name, weight, LoRA or None where missing)


def cat(parts: Parts) -> tuple[torch.Tensor, torch.Tensor]:
    """A = [A_1; …; A_n], B = [c_1 B_1 … c_n B_n] with c_i = w_i·s_i (the output's s is 1): exact."""
    present = [(w, p) for _, w, p in parts if p is not None]
    A = torch.cat([p.A.double() for _, p in present], dim=0)
    B = torch.cat([p.B.double() * (w * p.scaling) for w, p in present], dim=1)
    return A, B


def linear(module: str, parts: Parts) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's "linear": A = Σ sign(c_i)·√|c_i|·A_i, B = Σ √|c_i|·B_i, c_i = w_i·s_i. Cross terms make it inexact."""
    present = [(name, w, p) for name, w, p in parts if p is not None]
    ranks = {p.r for _, _, p in present}
    if len(ranks) > 1:
        detail = ", ".join(f"r={p.r} in {name}" for name, _, p in present)
        raise AdapterError(
            f"method 'linear' needs equal ranks, but {module} has {detail}; use 'cat' (exact) or 'svd' instead"
        )
    A = sum(math.copysign(math.sqrt(abs(w * p.scaling)), w * p.scaling) * p.A.double() for _, w, p in present)
    B = sum(math.sqrt(abs(w * p.scaling)) * p.B.double() for _, w, p in present)
    return A, B


def dense(
    method: str, module: str, parts: Parts, density: float | None, sign: str, seed: int
) -> torch.Tensor:
    """The combined ΔW (out, fan_in), float64, before truncation."""
    shape = next(p for _, _, p in parts if p is not None).delta().shape
    deltas = torch.stack(
        [p.delta() if p is not None else torch.zeros(shape, dtype=torch.float64) for *_, p in parts]
    )
    w = torch.tensor([w for _, w, _ in parts], dtype=torch.float64).view(-1, 1, 1)
    if method == "svd":
        return (w * deltas).sum(0)
    if method == "magnitude_prune":
        return (w * trim(deltas, density)).sum(0)
    if method == "ties":
        return disjoint_mean(w * trim(deltas, density), sign)
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{module}".encode()))
    keep = torch.rand(deltas.shape, generator=g, dtype=torch.float64) < density
    tau = w * deltas * keep / density
    return tau.sum(0) if method == "dare_linear" else disjoint_mean(tau, sign)


def trim(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the round(density·numel) (at least 1) largest-magnitude entries of each deltas[i], zero the rest."""
    flat = deltas.flatten(1)
    k = max(1, round(density * flat.shape[1]))
    if k >= flat.shape[1]:
        return deltas
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep.scatter_(1, flat.abs().topk(k, dim=1).indices, True)
    return (flat * keep).view_as(deltas)


def disjoint_mean(tau: torch.Tensor, sign: str) -> torch.Tensor:
    """TIES: elect γ = sign(Σ τ_i) (or of Σ sign(τ_i)), ties to +; mean of the τ_i whose sign is γ, per entry."""
    mass = tau.sum(0) if sign == "total" else tau.sign().sum(0)
    elected = torch.where(mass >= 0, 1.0, -1.0).to(tau.dtype)
    agree = tau.sign() == elected
    return (tau * agree).sum(0) / agree.sum(0).clamp(min=1)


def _svd_rank(svd_rank: int | None, parts: Parts) -> int:
    return svd_rank if svd_rank is not None else max(p.r for _, _, p in parts if p is not None)


def truncate(delta: torch.Tensor, rank: int, like: Lora) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors of `delta` (out, fan_in), shaped like `like`'s A and B: B = U·√S, A = √S·Vᵀ."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    rank = min(rank, S.shape[0])
    root = S[:rank].sqrt()
    B = U[:, :rank] * root
    A = root[:, None] * Vh[:rank]
    return A.reshape(rank, *like.A.shape[1:]), B.reshape(B.shape[0], rank, *like.B.shape[2:])


def combine_module(
    method: str, module: str, parts: Parts, density: float | None, svd_rank: int | None, sign: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The combined (A, B) of `module` by `method`, in float64, shaped like the sources' factors."""
    if method == "cat":
        return cat(parts)
    if method == "linear":
        return linear(module, parts)
    like = next(p for _, _, p in parts if p is not None)
    delta = dense(method, module, parts, density, sign, seed)
    return truncate(delta, _svd_rank(svd_rank, parts), like)
