"""KaSA, Knowledge-aware Singular-value Adaptation (Wang et al. 2024, arXiv 2412.06071; PEFT's `kasa_config`).

Two changes to LoRA, on each adapted linear layer with W0 = U·S·Vh (k = min(out, in)):

1. W0 loses its r smallest singular components: the layer computes with W0 − U_d·S_d·Vh_d, the "noisy long tail"
   the paper drops (d: the last r of the k).
2. The update has a learnable singular value per rank: ΔW = s·B·diag(d)·A, d a vector of r values (file key
   `lora_diag`, as PEFT's), B zero at the start so that only the truncation changes the output at first.

Training adds β·Σ d² + γ·(‖BᵀB − I‖_F + ‖AAᵀ − I‖_F) over the adapted layers to the loss (`kasa_loss`; the
training loop does it, PEFT leaves it to the user as `_get_kasa_loss`).

PEFT truncates W0 in place when the adapter is added: disabling, deleting or switching to another adapter keeps
the truncated weight, so KaSA cannot sit beside other adapters there. lorakit keeps W0 and holds the dropped part
on the adapter as two frozen factors (U_d·S_d, out × r, and Vh_d, r × in: a LoRA pair's size), subtracted beside
the update. So the adapter's whole change to W0 is the rank-2r product

    s·B·diag(d)·A − U_d·S_d·Vh_d  =  s·[B·diag(d), −U_d·S_d/s] · [A; Vh_d]

which `factors` gives: merging, the fused kernels, the chunked head loss and llama.cpp export (a rank-2r LoRA
file) see plain LoRA. Disabling, deleting, switching and mixed batches are exact; a 4-bit base works too (the SVD
is of its dequantized weight). A merged KaSA model equals PEFT's (its truncated W0 plus ΔW) within rounding.
The dropped factors are computed again from W0 at load, never saved: the file is PEFT's.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lorakit.config import LoraConfig
from lorakit.errors import AdapterError
from lorakit.handlers import Handler, TransposedHandler
from lorakit.layers import LoraAdapter, LoraLayer, Variant, register_variant
from lorakit.registry import lora_layers


def dropped_part(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_d·S_d (out × r), Vh_d (r × in)) of the r smallest singular components of `w` (2-D, float32)."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, -r:] * s[-r:], vh[-r:]


@register_variant
class KasaVariant(Variant):
    name = "kasa"
    label = "KaSA"

    @classmethod
    def selects(cls, config: LoraConfig) -> bool:
        return config.use_kasa

    @classmethod
    def refusal(cls, handler: Handler) -> str | None:
        if not handler.linear or isinstance(handler, TransposedHandler):
            return "KaSA adapts nn.Linear layers only (as in PEFT)"
        return None

    def tensor_names(self, handler: Handler) -> dict[str, str]:
        return {**super().tensor_names(handler), "lora_diag": "lora_diag"}

    def tensor_shapes(self, handler: Handler, base: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
        return {**super().tensor_shapes(handler, base, r), "lora_diag": (r,)}

    @torch.no_grad()
    def init(self, layer: LoraLayer, adapter: LoraAdapter) -> None:
        h, A = layer.handler, adapter.lora_A
        w = h.to_2d(h.weight(layer.base_layer)).float()  # a 4-bit base: its dequantized copy
        r = adapter.r
        if r >= min(w.shape):
            raise AdapterError(
                f"KaSA needs r < {min(w.shape)} (the weight's smaller side), so that a part of W0 is kept; got r={r}"
            )
        us, vh = dropped_part(w, r)
        adapter.register_buffer("kasa_us", us.to(A.dtype), persistent=False)
        adapter.register_buffer("kasa_vh", vh.to(A.dtype), persistent=False)
        # d starts as in PEFT (standard normal); B is zero, so the update is zero whatever d is
        adapter.lora_diag = nn.Parameter(
            torch.randn(r, dtype=A.dtype, device=A.device), requires_grad=A.requires_grad
        )

    def factors(self, adapter: LoraAdapter) -> tuple[torch.Tensor, torch.Tensor, float]:
        A, B = self._joined(adapter, 1.0)
        return A, B, 1.0

    def fused_factors(self, adapter: LoraAdapter) -> tuple[torch.Tensor, torch.Tensor] | None:
        # the kernels scale by s and drop out A's whole input; the dropped part sees the undropped input
        dropout = adapter.dropout
        if adapter.scaling == 0 or (adapter.training and isinstance(dropout, nn.Dropout) and dropout.p > 0):
            return None
        return self._joined(adapter, adapter.scaling)

    def plain_pair(self, adapter: LoraAdapter) -> tuple[torch.Tensor, torch.Tensor] | None:
        if adapter.scaling == 0:
            raise AdapterError("a KaSA adapter with scaling 0 (alpha 0) has no plain LoRA form")
        return self._joined(adapter, adapter.scaling)

    def _joined(self, adapter: LoraAdapter, s: float) -> tuple[torch.Tensor, torch.Tensor]:
        """[A; Vh_d] and [B·diag(d)·(scaling/s), −U_d·S_d/s]: with s, their product is the adapter's change to W0."""
        b = adapter.lora_B * adapter.lora_diag
        if s != adapter.scaling:
            b = b * (adapter.scaling / s)
        A = torch.cat([adapter.lora_A, adapter.kasa_vh.to(adapter.lora_A.dtype)])
        B = torch.cat([b, adapter.kasa_us.to(b.dtype) * (-1.0 / s)], dim=1)
        return A, B

    def forward(
        self, layer: LoraLayer, adapter: LoraAdapter, x: torch.Tensor, base_out: torch.Tensor
    ) -> torch.Tensor:
        A = adapter.lora_A
        if x.is_floating_point() and x.dtype != A.dtype:
            x = x.to(A.dtype)
        h = F.linear(adapter.dropout(x), A) * adapter.lora_diag
        y = F.linear(h, adapter.lora_B) * adapter.scaling
        y = y - F.linear(F.linear(x, adapter.kasa_vh.to(A.dtype)), adapter.kasa_us.to(A.dtype))
        return y if y.dtype == base_out.dtype else y.to(base_out.dtype)


def kasa_loss(
    model: nn.Module, beta: float | None = None, gamma: float | None = None, adapters=None
) -> torch.Tensor | None:
    """KaSA's regulariser over every KaSA adapter of `model` (those named in `adapters`, default the active ones):
    Σ_layers β·Σ d² + γ·(‖BᵀB − I‖_F + ‖AAᵀ − I‖_F), in float32 (PEFT's `_get_kasa_loss`). None: no KaSA adapter.
    β and γ default to each adapter's own `kasa_beta` and `kasa_gamma` (its LoraConfig).

    Layers of one shape are stacked and computed as one batch: a dozen operations per shape instead of a dozen per
    layer (on SmolLM2's 210 layers, forward and backward: 0.036 s against the loop's 0.065 s;
    benchmarks/bench_regularisers.py)."""
    reg = model.__dict__.get("_lorakit")
    infos = reg.adapters if reg is not None else {}
    groups: dict[tuple, list[LoraAdapter]] = {}
    for _, layer in lora_layers(model):
        for name in adapters if adapters is not None else list(layer.active):
            if name in layer.adapters and isinstance(layer.adapters[name].variant, KasaVariant):
                # an adapter outside the registry: LoraConfig's class attributes are the fields' defaults
                ad, config = layer.adapters[name], infos[name].config if name in infos else LoraConfig
                weights = (
                    config.kasa_beta if beta is None else beta,
                    config.kasa_gamma if gamma is None else gamma,
                )
                groups.setdefault((ad.lora_A.shape, ad.lora_B.shape, ad.lora_A.device, weights), []).append(ad)
    total = None
    for (*_, (b, g)), group in groups.items():
        A = torch.stack([_whole(ad.lora_A) for ad in group]).float()  # (n, r, in)
        B = torch.stack([_whole(ad.lora_B) for ad in group]).float()  # (n, out, r)
        d = torch.stack([_whole(ad.lora_diag) for ad in group]).float()  # (n, r)
        eye = torch.eye(d.shape[1], device=d.device)
        orth = torch.linalg.matrix_norm(B.mT @ B - eye).sum() + torch.linalg.matrix_norm(A @ A.mT - eye).sum()
        term = b * (d * d).sum() + g * orth
        total = term if total is None else total + term
    return total


def trained_kasa(model: nn.Module) -> list[str]:
    """The names of `model`'s active KaSA adapters that train with a regulariser (kasa_beta or kasa_gamma above 0):
    those whose regulariser a training loss needs."""
    reg = model.__dict__.get("_lorakit")
    if reg is None:
        return []
    return [
        n
        for n, info in reg.adapters.items()
        if info.config.use_kasa
        and (info.config.kasa_beta > 0 or info.config.kasa_gamma > 0)
        and info.trainable
        and n in reg.active
    ]


def _whole(p: torch.Tensor) -> torch.Tensor:
    """`p` itself; refused for a DTensor shard (FSDP2 outside the forward): gathering it here would add collectives
    to the backward beside FSDP's own, in an order no process agrees on."""
    if hasattr(p, "full_tensor"):
        raise AdapterError("kasa_loss needs whole parameters, and FSDP2 holds shards here; train KaSA with DDP")
    return p

