"""The training regularisers of KaSA (`lorakit.kasa_loss`) and AdaLoRA (`lorakit.orth_loss`) on SmolLM2-135M's
210 adapted layers: forward plus backward, stacked by shape (lorakit's) against layer by layer (the loop that
PEFT's `_get_kasa_loss` and AdaLoRA's regulariser run, written out here as the reference), interleaved, in
float32. Both give the same value (checked, 1e-5 relative); the table gives the median seconds of each.

    .venv/bin/python benchmarks/bench_regularisers.py --rounds 7
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import lorakit
from lorakit.variants.adalora import AdaLoraConfig, AdaLoraVariant, inject_adalora, orth_loss
from lorakit.variants.kasa import KasaVariant, kasa_loss


def kasa_per_layer(model, beta: float = 1e-4, gamma: float = 1e-3) -> torch.Tensor:
    total = 0
    for _, layer in lorakit.lora_layers(model):
        ad = layer.adapters["default"]
        if not isinstance(ad.variant, KasaVariant):
            continue
        A, B, d = ad.lora_A.float(), ad.lora_B.float(), ad.lora_diag.float()
        eye = torch.eye(d.shape[0])
        total = (
            total
            + beta * (d * d).sum()
            + gamma * (torch.linalg.norm(B.T @ B - eye) + torch.linalg.norm(A @ A.T - eye))
        )
    return total


def orth_per_layer(model) -> torch.Tensor:
    total, n = 0, 0
    for _, layer in lorakit.lora_layers(model):
        ad = layer.adapters["default"]
        if not isinstance(ad.variant, AdaLoraVariant):
            continue
        for cov in (ad.lora_A @ ad.lora_A.T, ad.lora_B.T @ ad.lora_B):
            total = total + torch.norm(cov - torch.eye(cov.shape[0]), p="fro")
            n += 1
    return total / n


def timed(fn, model) -> tuple[float, float]:
    model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    value = fn(model)
    value.backward()
    return time.perf_counter() - t, float(value.detach())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    print(
        f"cpu: {platform.processor() or platform.machine()}, {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}"
    )
    kasa, _ = lorakit.load_model(dtype=torch.float32)
    lorakit.inject(kasa, lorakit.LoraConfig(r=16, alpha=32, targets="all-linear", use_kasa=True))
    ada, _ = lorakit.load_model(dtype=torch.float32)
    inject_adalora(
        ada, lorakit.LoraConfig(targets="all-linear"), AdaLoraConfig(init_r=12, target_r=8, total_step=100)
    )
    with torch.no_grad():
        for p_ in lorakit.adapter_parameters(kasa):
            p_.add_(torch.randn_like(p_) * 0.01)  # B off zero: every term has a gradient
    cases = [
        ("KaSA kasa_loss", kasa, kasa_loss, kasa_per_layer),
        ("AdaLoRA orth_loss", ada, orth_loss, orth_per_layer),
    ]
    print("\n| regulariser | layers | stacked s | per layer s | per layer / stacked |")
    print("|---|---:|---:|---:|---:|")
    for label, model, stacked, looped in cases:
        for fn in (stacked, looped):  # warm up
            timed(fn, model)
        a, b = [], []
        for _ in range(args.rounds):
            ta, va = timed(stacked, model)
            tb, vb = timed(looped, model)
            a.append(ta)
            b.append(tb)
            assert abs(va - vb) <= 1e-5 * abs(vb), (label, va, vb)
        n = sum(1 for _ in lorakit.lora_layers(model))
        sa, sb = statistics.median(a), statistics.median(b)
        print(f"| {label} | {n} | {sa:.3f} | {sb:.3f} | {sb / sa:.1f}× |", flush=True)


if __name__ == "__main__":
    main()
