"""Pearson's and Spearman's correlations of 1-D tensors, for the measures of a regression and of an embedding
model's scored pairs (a leaf: it imports torch alone)."""

from __future__ import annotations

import torch


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson's correlation of two 1-D tensors; 0 where either is constant."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    scale = float(x.norm() * y.norm())
    return float((x * y).sum()) / scale if scale > 0 else 0.0


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Each value's rank, 1 to n, ties sharing their mean rank (Spearman's rule)."""
    order = torch.argsort(x, stable=True)
    out = torch.empty_like(x, dtype=torch.float64)
    out[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    for value in torch.unique(x):
        tied = x == value
        if int(tied.sum()) > 1:
            out[tied] = out[tied].mean()
    return out
