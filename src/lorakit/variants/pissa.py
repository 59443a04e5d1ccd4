"""PiSSA (Meng et al. 2024) and OLoRA (Büyükakyüz 2024) initialisations: A and B from a decomposition of W0, and
W0 keeps the residual, so that the model's output is unchanged at initialisation.

- PiSSA matches PEFT's `init_lora_weights="pissa"`: with W0 = U·S·Vh, A = diag(√(S_r/s))·Vh_r and
  B = U_r·diag(√(S_r/s)) (the top-r singular triplets), and W0 ← W0 − s·B·A. With `pissa_niter` N > 0 (PEFT's
  "pissa_niter_N") the triplets come from a randomised SVD (`torch.svd_lowrank(W0, q=r, niter=N)`'s operations,
  its draws from a generator seeded with 0 for each layer), faster on large weights. That start is not what a
  load computes (PEFT's own load draws again), so such an adapter keeps it (`LoraAdapter.start`) and saves as
  plain LoRA of rank 2r, as CorDA's does; a PEFT "pissa_niter_N" file loads with the exact SVD, with a warning.
- OLoRA matches PEFT's `init_lora_weights="olora"`: with W0 = Q·R (QR decomposition), B = Q[:, :r] and A = R[:r],
  and W0 ← W0 − s·B·A.

The removed part is kept on the adapter (`base_residual`), so deleting the adapter restores the original base
weight. Both are deterministic, and each registers its `factors` too: a saved adapter loads as plain LoRA on the
original base, its (A0, B0) computed again from W0 (`plain_lora.as_plain_lora`). Registered as the inits "pissa"
and "olora" (`LoraConfig(init="olora")`).
"""

from __future__ import annotations

import torch

from lorakit.errors import AdapterError
from lorakit.layers import LoraAdapter, LoraLayer, delta_weight, register_init


def decomposable_weight(layer: LoraLayer, adapter: LoraAdapter, what: str) -> torch.Tensor:
    """The base weight an init decomposes (and then changes in place), after checking it can."""
    h = layer.handler
    if h.quantized:
        raise AdapterError(
            f"{what} init moves the top-r part out of W0, which a 4-bit base cannot take; initialise {what} on "
            "the full-precision model (or use another init)"
        )
    if not h.linear:
        raise AdapterError(f"{what} init supports linear layers only, not {type(layer.base_layer).__name__}")
    w = h.weight(layer.base_layer)
    if not w.dtype.is_floating_point:
        raise AdapterError(f"{what} init needs a floating-point base weight (initialise before quantizing)")
    if adapter.r > min(w.shape):
        raise AdapterError(
            f"{what} init needs r <= {min(w.shape)} (the weight's smaller side), got r={adapter.r}"
        )
    return w


def move_into_adapter(layer: LoraLayer, adapter: LoraAdapter, w: torch.Tensor) -> None:
    """W0 ← W0 − s·B·A, keeping what was removed on the adapter."""
    removed = delta_weight(layer, adapter)
    w.sub_(removed.to(w.dtype))
    adapter.base_residual = removed.to(w.dtype).clone()


def svd_lowrank(
    a: torch.Tensor, q: int, niter: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`torch.svd_lowrank(a, q, niter)` (Halko et al.'s randomised SVD, the same operations), drawing its random
    matrix from `generator` instead of torch's global generator: (U, S, V) with a ≈ U·diag(S)·Vᵀ."""
    m, n = a.shape
    flip = m < n
    if flip:
        a = a.mT
    r = torch.randn(a.shape[-1], q, dtype=a.dtype, device=a.device, generator=generator)
    basis = torch.linalg.qr(a @ r).Q
    for _ in range(niter):
        basis = torch.linalg.qr(a.mH @ basis).Q
        basis = torch.linalg.qr(a @ basis).Q
    u, s, vh = torch.linalg.svd(basis.mH @ a, full_matrices=False)
    u, v = basis @ u, vh.mH
    return (v, s, u) if flip else (u, s, v)


def pissa_lowrank_factors(w: torch.Tensor, r: int, s: float, niter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) of PiSSA from a randomised SVD of W0 = `w` (2-D, f32) with `niter` power iterations (PEFT's
    "pissa_niter_N"), its draws from a generator seeded with 0."""
    u, sv, v = svd_lowrank(w, r, niter, torch.Generator(device=w.device).manual_seed(0))
    root = torch.sqrt(sv / s)
    return root[:, None] * v.T, u * root


def pissa_factors(w: torch.Tensor, r: int, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) of PiSSA for W0 = `w` (2-D, f32): the top-r singular triplets, each factor with √(S_r/s)."""
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    root = torch.sqrt(sv[:r] / s)
    return torch.diag(root) @ vh[:r], u[:, :r] @ torch.diag(root)


def olora_factors(w: torch.Tensor, r: int, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) of OLoRA for W0 = `w` (2-D, f32): R[:r] and Q[:, :r] of its QR decomposition (s plays no part)."""
    q, rr = torch.linalg.qr(w)
    return rr[:r], q[:, :r]


def _init(what: str, factors):
    @torch.no_grad()
    def init(layer: LoraLayer, adapter: LoraAdapter) -> None:
        w = decomposable_weight(layer, adapter, what)
        a, b = factors(layer.handler.to_2d(w).float(), adapter.r, adapter.scaling)
        adapter.lora_A.data.copy_(a)
        adapter.lora_B.data.copy_(b)
        move_into_adapter(layer, adapter, w)

    return init


@torch.no_grad()
def pissa_init(layer: LoraLayer, adapter: LoraAdapter) -> None:
    config = adapter.init_config
    niter = config.pissa_niter if config is not None else 0
    if not niter:
        _exact_pissa(layer, adapter)
        return
    w = decomposable_weight(layer, adapter, "PiSSA")
    a, b = pissa_lowrank_factors(layer.handler.to_2d(w).float(), adapter.r, adapter.scaling, niter)
    adapter.lora_A.data.copy_(a)
    adapter.lora_B.data.copy_(b)
    adapter.start = (adapter.lora_A.detach().clone(), adapter.lora_B.detach().clone())  # saved as plain LoRA
    move_into_adapter(layer, adapter, w)


_exact_pissa = _init("PiSSA", pissa_factors)
olora_init = _init("OLoRA", olora_factors)
register_init("pissa", pissa_init, factors=pissa_factors)
register_init("olora", olora_init, factors=olora_factors)
