"""Each training rewrite of the frozen base's blocks (lorakit.blocks) against transformers' own forward.

For every kind of block that lorakit rewrites (RMSNorm, the attention module with its RoPE, the SwiGLU MLP),
one module of the default model's shape (SmolLM2-135M: width 576, MLP 1536, 9 query and 3 key/value heads of 64)
is built from a Llama config with random frozen weights, and its forward plus backward to its input is timed
with the rewrite and with the class's forward, alternating, in one process; median of the repeats. The saving
a training step is the difference times the number of such blocks in the model (61 norms, 30 attentions, 30
MLPs). A rewrite that saves nothing has no place in lorakit.blocks.

    .venv/bin/python benchmarks/bench_blocks.py [--batch 4 --seq 256] [--dtype float32] [--write-docs]
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
SHAPE = {  # SmolLM2-135M-Instruct
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "num_hidden_layers": 30,
    "vocab_size": 49152,
}


def blocks(dtype):
    """(kind, module, how many a model has, a function that runs the module on x) for each rewritten block."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama as m

    config = LlamaConfig(**SHAPE, attn_implementation="sdpa")
    layers = config.num_hidden_layers
    torch.manual_seed(0)
    norm = m.LlamaRMSNorm(config.hidden_size, eps=1e-5)
    norm.weight.data.uniform_(0.5, 1.5)
    attn = m.LlamaAttention(config, layer_idx=0)
    mlp = m.LlamaMLP(config)
    rotary = m.LlamaRotaryEmbedding(config)
    for module in (norm, attn, mlp):
        module.to(dtype).requires_grad_(False).train()

    def run_attention(x):
        positions = torch.arange(x.shape[1]).unsqueeze(0).expand(x.shape[0], -1)
        return attn(x, position_embeddings=rotary(x, positions), attention_mask=None)[0]

    return [
        ("rmsnorm", norm, 2 * layers + 1, norm),
        ("rope", attn, layers, run_attention),
        ("swiglu", mlp, layers, mlp),
    ]


def measure(module, run, x, grad, repeats: int) -> tuple[float, float]:
    """Median seconds of forward + backward to x: transformers' forward, then the rewrite's, alternating."""
    from lorakit.blocks import set_lean_blocks

    def once(rewritten: bool) -> float:
        set_lean_blocks(module, rewritten)
        xi = x.detach().requires_grad_(True)
        t0 = time.perf_counter()
        run(xi).backward(grad)
        return time.perf_counter() - t0

    for rewritten in (False, True):  # warm-up
        once(rewritten)
    theirs, ours = [], []
    for _ in range(repeats):
        theirs.append(once(False))
        ours.append(once(True))
    set_lean_blocks(module, False)
    return statistics.median(theirs), statistics.median(ours)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.seq, SHAPE["hidden_size"], generator=g).to(dtype)
    grad = torch.randn(x.shape, generator=g).to(dtype)
    lines = [
        f"CPU: {cpu_name()} (torch capability {torch_capability()}), {args.threads} threads; {args.dtype}, batch "
        f"{args.batch}x{args.seq}, SmolLM2-135M shapes; forward + backward of one block, ms (median of "
        f"{args.repeats}, alternating).",
        "",
        "| rewrite | block | transformers, ms | lorakit, ms | ratio | blocks a model | saved a step, s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    total = 0.0
    for kind, module, count, run in blocks(dtype):
        theirs, ours = measure(module, run, x, grad, args.repeats)
        total += (theirs - ours) * count
        lines.append(
            f"| {kind} | {type(module).__name__} | {theirs * 1e3:.2f} | {ours * 1e3:.2f} | {ours / theirs:.2f}× "
            f"| {count} | {(theirs - ours) * count:.3f} |"
        )
        print(lines[-1], flush=True)
    lines += ["", f"All three: {total:.3f} s saved a training step.", "", f"Command: `{display_command()}`"]
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        marker = f"bench_blocks:{args.dtype}"
        write_docs(DOC, text, f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->")


if __name__ == "__main__":
    main()
