"""CPU flash attention's backward in bf16 against fp32 on upcast inputs: where does each win?

For each shape (batch x heads x tokens x head dim, at a fixed number of tokens a batch), the bf16 forward runs
once, and then its backward is timed two ways: torch's bf16 kernel, and lorakit's (upcast q, k, v, the output and
its gradient to fp32, the fp32 kernel, round the gradients back to bf16). Median of the timed repeats, in one
process, alternating the two. `lorakit.attention.MAX_KV_TIMES_HEAD_DIM` comes from this table.

    .venv/bin/python benchmarks/bench_attention.py [--tokens 1024 4096] [--write-docs]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from lorakit.bench import cpu_name, display_command, torch_capability, write_docs  # noqa: E402

DOC = ROOT / "docs" / "performance.md"
SHAPES = [(9, 64), (32, 64), (32, 128)]  # (heads, head dim): SmolLM2-135M, Llama-2-7B-like at 64, and at 128
LENGTHS = (32, 64, 128, 256, 512, 1024, 2048)


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def measure(heads: int, dim: int, batch: int, length: int, masked: bool, repeats: int) -> tuple[float, float]:
    import torch

    from lorakit.attention import _FlashUpcastBackward

    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(batch, heads, length, dim, generator=g).bfloat16() for _ in range(4))
    mask = None
    if masked:  # a padding-style additive mask, as a padded batch gets
        keep = torch.ones(length, length, dtype=torch.bool).tril()
        mask = torch.zeros(batch, 1, length, length, dtype=torch.bfloat16).masked_fill_(~keep, float("-inf"))
    fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    out, lse = fwd(q, k, v, 0.0, not masked, attn_mask=mask)

    class Ctx:  # what _FlashUpcastBackward.backward reads
        saved_tensors = (q, k, v, out, lse, mask)
        is_causal, scale = not masked, None

    def bf16():
        bwd(grad, q, k, v, out, lse, 0.0, not masked, attn_mask=mask)

    def upcast():
        _FlashUpcastBackward.backward(Ctx, grad)

    a, b = [], []
    for _ in range(3):  # alternate, so that drift hits both
        a.append(_time(bf16, repeats))
        b.append(_time(upcast, repeats))
    return statistics.median(a), statistics.median(b)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096], help="tokens a batch (batch x length)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args()
    import torch

    from lorakit.attention import MAX_KV_TIMES_HEAD_DIM

    torch.set_num_threads(args.threads)
    lines = [
        f"CPU: {cpu_name()} (torch capability {torch_capability()}), {args.threads} threads; the backward of one "
        "attention call, ms (median); lorakit takes the fp32 backward where length x head dim <= "
        f"{MAX_KV_TIMES_HEAD_DIM} (marked *).",
        "",
        "| heads x dim | tokens | batch x length | bf16 kernel, causal | fp32 on upcast, causal | ratio | "
        "bf16 kernel, masked | fp32 on upcast, masked | ratio |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for heads, dim in SHAPES:
        for tokens in args.tokens:
            for length in LENGTHS:
                batch = tokens // length
                if batch < 1 or batch * length != tokens:
                    continue
                row = [f"{heads} x {dim}", str(tokens), f"{batch} x {length}"]
                for masked in (False, True):
                    a, b = measure(heads, dim, batch, length, masked, args.repeats)
                    row += [f"{a * 1e3:.1f}", f"{b * 1e3:.1f}", f"{b / a:.2f}×"]
                if length * dim <= MAX_KV_TIMES_HEAD_DIM:
                    row[2] += " *"
                lines.append("| " + " | ".join(row) + " |")
                print(lines[-1], flush=True)
    lines += ["", f"Command: `{display_command()}`"]
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        write_docs(DOC, text, "<!-- bench_attention:begin -->", "<!-- bench_attention:end -->")


if __name__ == "__main__":
    main()
