"""One NF4 layer on the CPU: dequantize and one decoded token, lorakit's native kernels vs the torch ops vs
bitsandbytes' CPU kernels. Minimum of 5 runs after a warm-up, in one process (kernels, not whole steps).

    python benchmarks/bench_nf4_kernels.py                    # SmolLM2-1.7B's MLP (8192×2048), 7B's (11008×4096)
"""

from __future__ import annotations

import time

import torch

from lorakit.quant import native
from lorakit.quant.nf4 import NF4Linear, scratch_weight


def best(fn, n: int = 5) -> float:
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf

    torch.set_num_threads(2)
    print(
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, 2 threads, kernels' vector width: {native.simd()}, int8 route: {native.int8_route()}"
    )
    print(
        "| layer | dtype | dequantize: kernels / torch ops / bnb, ms "
        "| 1 token: kernels' int8 route / fp32 route / bnb matmul_4bit, ms |"
    )
    print("|---|---|---|---|")
    for out_f, in_f in ((8192, 2048), (11008, 4096)):
        w = torch.randn(out_f, in_f) * 0.02
        layer = NF4Linear.from_linear(_with_weight(in_f, out_f, w))
        for dtype in (torch.float32, torch.bfloat16):
            ours = best(lambda dtype=dtype, layer=layer: scratch_weight(layer, dtype))
            old = native.set_enabled(False)
            torch_ops = best(lambda dtype=dtype, layer=layer: layer.dequantize(dtype))
            native.set_enabled(old)
            q, state = bf.quantize_4bit(w.to(dtype), quant_type="nf4", blocksize=64, compress_statistics=True)
            theirs = best(lambda q=q, state=state: bf.dequantize_4bit(q, state))
            x = torch.randn(1, in_f).to(dtype)
            with torch.no_grad():
                tok = best(lambda x=x, layer=layer: layer(x))  # the int8 route where the kernels have one
                old = native.set_gemv_int8(False)
                tok_fp32 = best(lambda x=x, layer=layer: layer(x))
                native.set_gemv_int8(old)
                tok_bnb = best(lambda x=x, q=q, state=state: bnb.matmul_4bit(x, q.t(), quant_state=state))
            name = str(dtype).removeprefix("torch.")
            print(
                f"| {out_f}×{in_f} | {name} | {ours:.1f} / {torch_ops:.1f} / {theirs:.1f} | {tok:.2f} / {tok_fp32:.2f} / {tok_bnb:.2f} |"
            )


def _with_weight(in_f: int, out_f: int, w: torch.Tensor) -> torch.nn.Linear:
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    lin.weight.data = w
    return lin


if __name__ == "__main__":
    main()
