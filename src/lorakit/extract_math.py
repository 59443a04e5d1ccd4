"""The arithmetic of `lorakit.extract` on one weight: the SVD of its ΔW (full, or randomised), shared between the
modules of a tied weight, and how many singular triplets the adapter keeps."""

from __future__ import annotations

import torch

RTOL = 1e-4
"""Singular values below RTOL × the largest count as zero: what they carry is below 1e-8·min(d, k) of ‖ΔW‖²_F."""
OVERSAMPLE = 10
"""Extra singular triplets a randomised SVD computes beyond r (Halko et al.'s usual 5-10), for accuracy."""
CHUNK_ROWS = 4096


def svd_once(
    shared: dict[str, tuple], pname: str, flip: bool, delta: torch.Tensor, r: int, niter: int | None
):
    """`svd`, once per tied parameter: its other module (the output head beside the input embedding) sees the
    same ΔW, or, where one handler transposes the stored weight and the other does not, its transpose, whose SVD
    swaps U and V."""
    if pname not in shared:
        shared[pname] = (flip, svd(delta, r, niter))
    was, (u, s, vh, total) = shared[pname]
    return (u, s, vh, total) if was == flip else (vh.T, s, u.T, total)


def flips(h) -> bool:
    """Whether the handler's 2-D view of a 2-D weight is its transpose (Embedding, GPT-2's Conv1D)."""
    return tuple(h.to_2d(torch.empty(2, 3, device="meta")).shape) == (3, 2)


def svd(delta: torch.Tensor, r: int, niter: int | None):
    """(U, S, Vh, ‖delta‖²_F): the full SVD, or with `niter` the top r + OVERSAMPLE triplets of a randomised one
    (Halko et al. 2011, `torch.svd_lowrank`), seeded so that the same inputs give the same adapter."""
    total = sum(
        rows.double().square().sum().item() for rows in delta.split(CHUNK_ROWS)
    )  # no float64 copy of it all
    if niter is None:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return u, s, vh, total
    q = min(r + OVERSAMPLE, *delta.shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(delta, q=q, niter=niter)
    return u, s, v.T, total


def rank_of(s: torch.Tensor, r: int, energy: float | None, total: float) -> int:
    """How many singular values (descending) to keep: at most r, none below RTOL·s[0], and with `energy` the fewest
    that keep that fraction of `total` = ‖ΔW‖²_F (at least 1)."""
    k = min(r, int((s > s[0] * RTOL).sum()))
    if energy is not None:
        kept = s.double().square().cumsum(0) / total
        k = min(k, int((kept < energy - 1e-12).sum()) + 1)
    return max(k, 1)
