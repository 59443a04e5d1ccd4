"""The chunked LM-head loss (lorakit.head.lm_head_loss) at several chunk sizes, against transformers' own loss.

transformers computes a causal LM's loss from full logits: one GEMM hidden·Wᵀ of (rows × vocab), a float32
cross-entropy over it, and in the backward a second GEMM ∂logits·W, keeping the whole logits tensor (and its
gradient) alive. lorakit's chunked loss computes the loss and ∂hidden chunk by chunk in the forward pass, so no
full logits tensor ever exists; but a chunk's two GEMMs run below the cores' rate when it has few rows. This
bench times the loss plus its backward to the hidden states at the default model's head shape (SmolLM2-135M:
width 576, vocabulary 49,152; batch 4×256, so 1,020 shifted rows), with random frozen weights, for transformers'
path and for each chunk size, alternating in one process; median of the rounds. `default` is the chunk that
`_chunk_rows` picks.

    .venv/bin/python benchmarks/bench_head.py [--batch 4 --seq 256] [--chunks 85 128 256 512 1020] [--write-docs]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from lorakit.bench import cpu_name, display_command, spread, torch_capability, write_docs  # noqa: E402

DOC = ROOT / "docs" / "performance.md"
WIDTH, VOCAB = 576, 49152  # SmolLM2-135M-Instruct


def hf_loss(hidden, weight, labels):
    """transformers' ForCausalLMLoss on full logits (float32 upcast, shift by one, mean over learned tokens)."""
    import torch.nn.functional as F
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = F.linear(hidden, weight)
    return ForCausalLMLoss(logits, labels, vocab_size=weight.shape[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--chunks", type=int, nargs="+", default=[85, 128, 256, 512, 1020])
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args()
    if args.rounds < 1 or any(c < 1 for c in args.chunks):
        p.error("--rounds and every --chunks value must be at least 1")
    import torch

    from lorakit.head import _chunk_rows, lm_head_loss

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(VOCAB, WIDTH, generator=g) * 0.02).to(dtype)
    hidden = torch.randn(args.batch, args.seq, WIDTH, generator=g).to(dtype)
    labels = torch.randint(0, VOCAB, (args.batch, args.seq), generator=g)
    default = _chunk_rows(VOCAB)
    chunks = sorted(set(args.chunks) | {default})

    def run(chunk: int | None) -> tuple[float, torch.Tensor, torch.Tensor]:
        h = hidden.detach().requires_grad_(True)
        t0 = time.perf_counter()
        loss = hf_loss(h, weight, labels) if chunk is None else lm_head_loss(h, weight, labels, chunk=chunk)
        loss.backward()
        return time.perf_counter() - t0, loss.detach(), h.grad

    variants: list[int | None] = [None, *chunks]
    _, ref_loss, ref_grad = run(None)
    for chunk in chunks:  # warm-up, and the check that every chunk computes transformers' loss and gradient
        _, loss, grad = run(chunk)
        # fp32: the same sums in another order, a few ulps of a ~11-nat loss; bf16 rounds the logits' inputs alike
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(loss.float(), ref_loss.float(), rtol=tol, atol=tol)
        scale = ref_grad.float().abs().max().item()
        torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=tol, atol=tol * scale)
    times: dict[int | None, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            times[v].append(run(v)[0])
    hf = statistics.median(times[None])
    rows = args.batch * (args.seq - 1)  # shifted: the last position has no label
    full = args.batch * args.seq  # transformers' logits include it
    lines = [
        f"CPU: {cpu_name()} (torch capability {torch_capability()}), {args.threads} threads; {args.dtype}, "
        f"{rows:,} rows (batch {args.batch}x{args.seq}), head {WIDTH}x{VOCAB:,}; loss plus backward to the hidden "
        f"states, median [range] of {args.rounds} alternating rounds. Every chunk size gives transformers' loss "
        "and gradient (checked before timing).",
        "",
        "| loss | rows a chunk | logits buffer, MB | seconds | / transformers |",
        "|---|---:|---:|---:|---:|",
        f"| transformers (full logits) | {full} | {full * VOCAB * 4 / 2**20:.0f} | {spread(times[None], '.3f')} "
        "| 1.00× |",
    ]
    for chunk in chunks:
        t = times[chunk]
        label = "lorakit, default" if chunk == default else "lorakit"
        lines.append(
            f"| {label} | {chunk} | {min(chunk, rows) * VOCAB * 4 / 2**20:.0f} | {spread(t, '.3f')} "
            f"| {statistics.median(t) / hf:.2f}× |"
        )
    lines += ["", f"Command: `{display_command()}`"]
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        marker = f"bench_head:{args.dtype}"
        write_docs(DOC, text, f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->")


if __name__ == "__main__":
    main()
