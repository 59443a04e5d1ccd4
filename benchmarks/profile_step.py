"""Where one LoRA training step's time goes on the CPU: `torch.profiler` over a step of the default model.

Each of ``--variants`` is one of `lorakit bench`'s setups (lorakit.bench_worker): ``lorakit`` is what `lorakit
train` runs (``lorakit.inject`` with r=16 on the seven projections, the fused LoRA layers, the block rewrites,
the chunked LM-head loss, backward, AdamW); ``peft`` is PEFT with the model's own loss; ``bound`` is the frozen
base alone (forward and backward to the input embeddings). All are built in one process and, after a warm-up
step each, profiled in ``--steps`` interleaved rounds of one step. Every operator's *self* CPU time (time in the
op itself, not in the ops it calls) is summed into categories:

* matmuls: mm, addmm, bmm, linear (the frozen base's projections and the LoRA products);
* attention: scaled_dot_product_attention and its kernels, and a plain softmax;
* norms and activations: RMSNorm's pow/mean/rsqrt/mul, SiLU and the SwiGLU product, RoPE's cat/neg/mul,
  residual adds;
* copies and layout: copy_, to, contiguous, cat, transpose materialisations, index ops;
* the loss: the log-softmax and NLL of the model's own loss, the logsumexp and exp of the chunked one;
* the optimizer: AdamW's foreach kernels and zero_grad;
* autograd and Python: the autograd engine's bookkeeping and the Python bodies of custom autograd functions;
* allocation: empty, zeros, fill (page faults of fresh memory land here);
* the rest.

Prints a markdown table, side by side, and writes a bar chart of the first variant (``--plot``); ``--write-docs``
puts both in docs/performance.md. With PEFT and the bound in the table it also prints the floor that exact
rewrites cannot pass: the frozen base's matmuls plus attention, as a share of PEFT's operator time.

    .venv/bin/python benchmarks/profile_step.py [--batch 4 --seq 256] [--dtype float32] [--variants lorakit peft bound] [--write-docs]
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

from lorakit.bench import LABELS, cpu_name, display_command, torch_capability, write_docs  # noqa: E402

CATEGORIES = [  # first match wins; patterns on the aten op name
    ("matmuls", r"^aten::(mm|addmm_?|bmm|matmul|linear|baddbmm|_addmm_activation)$"),
    # before attention, whose softmax pattern would also match log_softmax
    (
        "loss",
        r"^aten::(logsumexp|exp_?|sub_|_?log_softmax|_log_softmax_backward_data|nll_loss|cross_entropy)",
    ),
    ("attention", r"scaled_dot_product|flash_attention|_efficient_attention|^aten::_?softmax"),
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


def profile(args) -> dict[str, tuple[dict[str, float], float, list[tuple[str, float]]]]:
    """{variant: (seconds a step by category, wall seconds a step, the largest operators)}; the variants are
    built once and profiled in interleaved rounds, one step each, so that a slow spell hits all of them."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    from lorakit.bench_worker import in_process_steps

    steps = in_process_steps(args)  # built and warmed up as bench_interleaved.py builds them

    per_cat = {n: defaultdict(float) for n in args.variants}
    per_op = {n: defaultdict(float) for n in args.variants}
    wall = dict.fromkeys(args.variants, 0.0)
    for _ in range(args.steps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            with tprofile(activities=[ProfilerActivity.CPU]) as prof:
                step()
            wall[name] += (time.perf_counter() - t0) / args.steps
            for evt in prof.key_averages():
                if evt.key.startswith("ProfilerStep"):
                    continue
                self_s = evt.self_cpu_time_total / 1e6 / args.steps
                per_cat[name][categorize(evt.key)] += self_s
                per_op[name][evt.key] += self_s
    return {
        n: (dict(per_cat[n]), wall[n], sorted(per_op[n].items(), key=lambda kv: -kv[1])[: args.top])
        for n in args.variants
    }


# What each variant is, in the table's words.
FIXED = ("matmuls", "attention")  # what exact rewrites of the other ops cannot make cheaper


def table(results, args) -> str:
    names = list(results)
    first = names[0]
    totals = {n: sum(results[n][0].values()) for n in names}
    cats = sorted({c for n in names for c in results[n][0]}, key=lambda c: -results[first][0].get(c, 0.0))
    lines = [
        f"CPU: {cpu_name()} (torch capability {torch_capability()}), {args.threads} threads; default model, "
        f"batch {args.batch}x{args.seq}, r=16 on the seven projections, base {args.dtype}; operator self time, "
        f"s a step, mean of {args.steps} profiled step(s) of each variant, in interleaved rounds.",
        "",
        "| category | " + " | ".join(LABELS.get(n, n) for n in names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for cat in cats:
        cells = []
        for n in names:
            s = results[n][0].get(cat, 0.0)
            cells.append(f"{s:.3f} ({100 * s / totals[n]:.0f}%)")
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    lines.append("| **all operators** | " + " | ".join(f"**{totals[n]:.3f}**" for n in names) + " |")
    lines.append(
        "| wall time under the profiler | " + " | ".join(f"{results[n][1]:.2f}" for n in names) + " |"
    )
    fixed = {n: sum(results[n][0].get(c, 0.0) for c in FIXED) for n in names}
    lines.append(
        "| matmuls + attention | "
        + " | ".join(f"{fixed[n]:.3f} ({100 * fixed[n] / totals[n]:.0f}%)" for n in names)
        + " |"
    )
    if "peft" in names:
        lines += ["", "Against PEFT's operator time:", ""]
        for n in names:
            if n != "peft":
                lines.append(f"- {LABELS.get(n, n)}: {totals[n] / totals['peft']:.3f}×")
        if "bound" in names:
            floor = fixed["bound"] / totals["peft"]
            lines.append(
                f"- the frozen base's matmuls and attention alone: {floor:.3f}× PEFT's operator time. A step that "
                "keeps the base's math exact cannot go below it unless the GEMM and attention kernels themselves "
                "get faster."
            )
    lines += [
        "",
        f"The {args.top} largest operators of {LABELS.get(first, first)} (self time):",
        "",
        "| operator | s a step |",
        "|---|---:|",
    ]
    lines += [f"| `{name}` | {s:.3f} |" for name, s in results[first][2]]
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
    p.add_argument(
        "--variants",
        nargs="+",
        default=["lorakit", "peft", "bound"],
        choices=list(LABELS),
        help="bench variants to profile, in one process; the first is charted",
    )
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--plot", default=str(ROOT / "docs" / "profile.png"))
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args()
    args.dropout, args.device = 0.0, "cpu"  # what the bench variants read
    results = profile(args)
    text = table(results, args)
    per_cat = results[args.variants[0]][0]
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
