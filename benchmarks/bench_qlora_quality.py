"""QLoRA vs fp32 LoRA on the built-in task: the same `lorakit train` run, once on the fp32 base and once on the
NF4 base (`--model.quantize nf4`), same seed, data, steps and settings. Reports exact-match accuracy and eval loss
before and after training, training time and peak RSS, read from each run's summary.json.

    .venv/bin/python benchmarks/bench_qlora_quality.py [--steps 40] [--write-docs] [-- extra train overrides]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_step import write_docs  # noqa: E402

VARIANTS = {"fp32 LoRA": [], "QLoRA (NF4 base)": ["--model.quantize", "nf4"]}


def run(name: str, extra: list[str], out: Path, steps: int, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "lorakit", "train", "--train.out_dir", str(out), "--train.steps", str(steps)]
    cmd += ["--train.save_every", "0", *extra, *overrides]
    print(f"{name}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("overrides", nargs="*", help="more `lorakit train` overrides, after --")
    args = p.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in VARIANTS.items():
            rows[name] = run(name, extra, Path(tmp) / name.split()[0], args.steps, args.overrides)
    lines = [
        "| base | accuracy before | accuracy after | eval loss after | train time, s | peak RSS, GB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in rows.items():
        lines.append(
            f"| {name} | {100 * s['before'].get('accuracy', float('nan')):.1f}% | "
            f"{100 * s['after'].get('accuracy', float('nan')):.1f}% | {s['after']['loss']:.4f} | "
            f"{s['train_seconds']:.0f} | {s['peak_rss_gb']:.2f} |"
        )
    a, b = (rows[n]["after"].get("accuracy", float("nan")) for n in VARIANTS)
    lines.append(f"\nQLoRA - fp32 LoRA accuracy: {100 * (b - a):+.1f} points.")
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        cmd = " ".join(["python benchmarks/bench_qlora_quality.py", *sys.argv[1:]])
        section = (
            "## QLoRA vs fp32 LoRA: accuracy on the built-in task\n\n"
            f"- command: `{cmd}`\n"
            f"- setup: `lorakit train` defaults (SmolLM2-135M-Instruct, built-in `dates` task, r=16, alpha=32, "
            f"all-linear, batch 8, lr 2e-3), {args.steps} steps, seed 0, {os.cpu_count()} CPUs; the QLoRA run "
            "adds `--model.quantize nf4` (double quantization, head/tied embedding in fp32). Accuracy: exact "
            "match of greedy answers on 100 held-out examples.\n\n" + table
        )
        docs = Path(__file__).parent.parent / "docs" / "benchmarks.md"
        write_docs(docs, section, "<!-- bench_qlora_quality:start -->", "<!-- bench_qlora_quality:end -->")


if __name__ == "__main__":
    main()
