"""LoftQ against plain QLoRA init on the built-in task, with fp32 LoRA as the reference.

1. The first forward pass: the logits of the NF4 base plus the freshly initialised adapter, against the fp32
   model's, on the task's eval prompts (RMS and max |difference|). Plain QLoRA starts at Q (B = 0); LoftQ at
   Q + s·B·A ≈ W0.
2. Training: the same `lorakit train` run (same seed, data, steps) on the fp32 base, on the NF4 base with the
   default init, and with LoftQ (1 and 2 steps). Eval loss and exact-match accuracy before and after.

    .venv/bin/python benchmarks/bench_loftq.py [--steps 30] [--write-docs] [-- extra train overrides]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_qlora_quality import run  # noqa: E402
from bench_step import write_docs  # noqa: E402

R, ALPHA = 16, 32
VARIANTS = {
    "fp32 LoRA": [],
    "QLoRA, default init": ["--model.quantize", "nf4"],
    "QLoRA, LoftQ init, 1 step": ["--model.quantize", "nf4", "--lora.init", "loftq"],
    "QLoRA, LoftQ init, 2 steps": [
        "--model.quantize",
        "nf4",
        "--lora.init",
        "loftq",
        "--lora.loftq_iter",
        "2",
    ],
}


def first_forward(prompts: int = 16) -> dict[str, dict[str, float]]:
    """RMS and max |logits − fp32 logits| right after init, per variant (no training)."""
    import lorakit
    from lorakit.data.tasks import make_task

    model, tok = lorakit.load_model()
    _, eval_ex = make_task("dates", n_train=1, n_eval=prompts, seed=0)
    texts = [
        tok.apply_chat_template([{"role": "user", "content": e["prompt"]}], tokenize=False) for e in eval_ex
    ]
    enc = tok(texts, return_tensors="pt", padding=True)
    mask = enc["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**enc).logits[mask]
    out = {}
    for name, init, iters in (
        ("QLoRA, default init", "default", 1),
        ("QLoRA, LoftQ init, 1 step", "loftq", 1),
        ("QLoRA, LoftQ init, 2 steps", "loftq", 2),
    ):
        q, _, _ = lorakit.load_quantized(None)
        start = time.perf_counter()
        lorakit.inject(
            q, lorakit.LoraConfig(r=R, alpha=ALPHA, targets="all-linear", init=init, loftq_iter=iters)
        )
        seconds = time.perf_counter() - start
        with torch.no_grad():
            diff = q(**enc).logits[mask] - ref
        out[name] = {
            "rms": diff.pow(2).mean().sqrt().item(),
            "max": diff.abs().max().item(),
            "init_s": seconds,
        }
        print(
            f"{name}: first-forward logits RMS {out[name]['rms']:.4f}, init {seconds:.1f} s", file=sys.stderr
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("overrides", nargs="*", help="more `lorakit train` overrides, after --")
    args = p.parse_args()
    cpu = torch.backends.cpu.get_cpu_capability()
    ff = first_forward()
    settings = ["--lora.r", str(R), "--lora.alpha", str(ALPHA), "--lora.targets", "all-linear"]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(VARIANTS.items()):
            rows[name] = run(name, [*extra, *settings], Path(tmp) / str(i), args.steps, args.overrides)
    lines = [
        "| base and init | first-forward logits vs fp32: RMS, max | eval loss before | eval loss after | "
        "accuracy before | accuracy after |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in rows.items():
        f = ff.get(name)
        first = f"{f['rms']:.3f}, {f['max']:.2f}" if f else "0 (the reference)"
        lines.append(
            f"| {name} | {first} | {s['before']['loss']:.4f} | {s['after']['loss']:.4f} | "
            f"{100 * s['before'].get('accuracy', float('nan')):.1f}% | "
            f"{100 * s['after'].get('accuracy', float('nan')):.1f}% |"
        )
    table = "\n".join(lines)
    print(table)
    record = {"cpu": cpu, "steps": args.steps, "first_forward": ff, "runs": rows, "command": sys.argv}
    results = Path(__file__).parent / "results" / "loftq.jsonl"
    with results.open("a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
    if args.write_docs:
        cmd = " ".join(["python benchmarks/bench_loftq.py", *sys.argv[1:]])
        inits = {n: ff[n]["init_s"] for n in ff}
        section = (
            "## LoftQ init against plain QLoRA init\n\n"
            f"- command: `{cmd}`; CPU capability {cpu}; r={R}, alpha={ALPHA} on all linear layers, "
            f"{args.steps} steps, the same seed and data for every row\n"
            f"- LoftQ's init time on SmolLM2-135M (one SVD per layer, W0 read back from the checkpoint): "
            + ", ".join(f"{n.split(', ', 1)[1]} {s:.0f} s" for n, s in inits.items())
            + "\n\n"
            + table
            + "\n"
        )
        write_docs(
            Path(__file__).parents[1] / "docs" / "qlora.md",
            section,
            "<!-- bench_loftq:start -->",
            "<!-- bench_loftq:end -->",
        )


if __name__ == "__main__":
    main()
