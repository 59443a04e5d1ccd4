"""Where one LoRA training step's time goes on the CPU: `torch.profiler` over a step of the default model.

The step is what `lorakit train` runs: ``lorakit.inject`` (r=16 on the seven projections), the fused LoRA layers,
the chunked LM-head loss, backward, AdamW. After one warm-up step, ``--steps`` steps are profiled; every
operator's *self* CPU time (time in the op itself, not in the ops it calls) is summed into categories:

* matmuls: mm, addmm, bmm, linear (the frozen base's projections and the LoRA products);
* attention: scaled_dot_product_attention and its kernels;
* norms and activations: RMSNorm's pow/mean/rsqrt/mul, SiLU and the SwiGLU product, RoPE's cat/neg/mul,
  residual adds;
* copies and layout: copy_, to, contiguous, cat, transpose materialisations, index ops;
* the loss: logsumexp, exp, softmax pieces of the chunked loss;
* the optimizer: AdamW's foreach kernels and zero_grad;
* autograd and Python: the autograd engine's bookkeeping and the Python bodies of custom autograd functions;
* allocation: empty, zeros, fill (page faults of fresh memory land here);
* the rest.

Prints a markdown table and writes a bar chart (``--plot``); ``--write-docs`` puts both in docs/performance.md.

    .venv/bin/python benchmarks/profile_step.py [--batch 4 --seq 256] [--dtype float32] [--write-docs]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from lorakit.bench import cpu_name, display_command, torch_capability, write_docs  # noqa: E402
from lorakit.bench_worker import TARGETS  # noqa: E402

CATEGORIES = [  # first match wins; patterns on the aten op name
    ("matmuls", r"^aten::(mm|addmm_?|bmm|matmul|linear|baddbmm|_addmm_activation)$"),
    ("attention", r"scaled_dot_product|flash_attention|_efficient_attention|softmax_backward|_softmax"),
    ("loss", r"^aten::(logsumexp|exp_?|sub_|log_softmax|nll_loss)"),
    ("optimizer", r"_foreach|lerp|addcdiv|addcmul|sqrt|Optimizer|zero_"),
    (
        "norms and activations",
        r"^aten::(pow|mean|rsqrt|mul_?|add_?|silu|silu_backward|neg|sigmoid|div_?|sum|sub)$",
    ),
    (
        "copies and layout",
        r"^aten::(copy_|to|_to_copy|contiguous|clone|cat|index|index_select|slice|transpose|t|"
        r"view|reshape|expand|_unsafe_view|as_strided|unsqueeze|squeeze|permute|select|embedding|index_add_|"
        r"embedding_dense_backward|masked_fill_?|where|gather|scatter_?)",
    ),
    ("autograd and Python", r"^(autograd::|_[A-Z]|[A-Z]|torch::autograd|<built-in)"),
    ("allocation", r"^aten::(empty|empty_like|zeros|zeros_like|ones|full|fill_|new_empty|new_zeros|resize_)"),
]


def categorize(name: str) -> str:
    for cat, pattern in CATEGORIES:
        if re.search(pattern, name):
            return cat
    return "the rest"


def profile(args) -> tuple[dict[str, float], float, list[tuple[str, float]]]:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    import lorakit
    from lorakit.device import autocast, placement, upcast_trainable
    from lorakit.fused import causal_lm_loss

    torch.set_num_threads(args.threads)
    device, dtype = placement("cpu", args.dtype)
    model, _ = lorakit.load_model(args.model, dtype=dtype, device=device)
    lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=16, targets=TARGETS))
    upcast_trainable(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(
        0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)
    )

    def step():
        with autocast(device, dtype):
            loss = causal_lm_loss(model, {"input_ids": ids, "labels": ids})
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    t0 = time.perf_counter()
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    wall = (time.perf_counter() - t0) / args.steps
    per_cat: dict[str, float] = defaultdict(float)
    per_op: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        if evt.key.startswith("ProfilerStep"):
            continue
        self_s = evt.self_cpu_time_total / 1e6 / args.steps
        per_cat[categorize(evt.key)] += self_s
        per_op[evt.key] += self_s
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[: args.top]
    return dict(per_cat), wall, top


def table(per_cat: dict[str, float], wall: float, top: list[tuple[str, float]], args) -> str:
    total = sum(per_cat.values())
    lines = [
        f"CPU: {cpu_name()} (torch capability {torch_capability()}), {args.threads} threads; default model, "
        f"batch {args.batch}x{args.seq}, r=16 on the seven projections, base {args.dtype}; mean of {args.steps} "
        f"profiled step(s): {wall:.2f} s a step under the profiler, {total:.2f} s of operator self time.",
        "",
        "| category | s a step | share |",
        "|---|---:|---:|",
    ]
    for cat, s in sorted(per_cat.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {cat} | {s:.3f} | {100 * s / total:.1f}% |")
    lines += [
        "",
        f"The {len(top)} largest operators (self time):",
        "",
        "| operator | s a step |",
        "|---|---:|",
    ]
    lines += [f"| `{name}` | {s:.3f} |" for name, s in top]
    lines.append(f"\nCommand: `{display_command()}`")
    return "\n".join(lines)


def plot(per_cat: dict[str, float], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(per_cat.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.barh([k for k, _ in items], [v for _, v in items], color="#4a7ab5")
    total = sum(per_cat.values())
    for i, (_, v) in enumerate(items):
        ax.text(v, i, f" {v:.2f} s ({100 * v / total:.0f}%)", va="center", fontsize=8)
    ax.set_xlabel("operator self time per step, s")
    ax.set_title(title, fontsize=9)
    ax.set_xlim(0, max(per_cat.values()) * 1.35)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(out)


def main() -> None:
    import os

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--model", default=None)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--plot", default=str(ROOT / "docs" / "profile.png"))
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args()
    per_cat, wall, top = profile(args)
    text = table(per_cat, wall, top, args)
    print(text)
    plot(
        per_cat,
        Path(args.plot),
        f"One LoRA training step, SmolLM2-135M, {args.batch}x{args.seq}, {args.dtype}",
    )
    if args.write_docs:
        write_docs(
            ROOT / "docs" / "performance.md",
            text + "\n\n![where a step's time goes](profile.png)",
            "<!-- profile_step:begin -->",
            "<!-- profile_step:end -->",
        )


if __name__ == "__main__":
    main()
