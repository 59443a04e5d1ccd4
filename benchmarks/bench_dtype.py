"""The main job in float32 and in bfloat16 on the CPU, in one run: does quality hold, and what does bf16 save?

Runs ``lorakit train`` (the built-in task, the default model, its defaults otherwise) twice, with
``--model.dtype float32`` and ``--model.dtype bfloat16`` (the frozen base in bf16, the adapters, AdamW and the
loss in fp32), and tabulates exact-match accuracy and eval loss before and after, the training time, tokens/s
and peak RSS. It prints the CPU's torch capability and what ``--model.dtype auto`` resolves to here.

    .venv/bin/python benchmarks/bench_dtype.py [--steps 40] [--write-docs] [-- extra train overrides]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from lorakit.bench import cpu_name, display_command, torch_capability, write_docs  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_qlora_quality import run  # noqa: E402  (one `lorakit train` run, its summary.json)

DTYPES = ("float32", "bfloat16")
DOC = ROOT / "docs" / "performance.md"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("overrides", nargs="*", help="more `lorakit train` overrides, after --")
    args = p.parse_args()
    import torch

    from lorakit.device import cpu_bf16_native, resolve_dtype

    auto = str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in DTYPES:
            rows[dtype] = run(dtype, ["--model.dtype", dtype], Path(tmp) / dtype, args.steps, args.overrides)
    lines = [
        f"CPU: {cpu_name()} (torch capability {torch_capability()}); native bf16 here: "
        f"{'yes' if cpu_bf16_native() else 'no'}, so `--model.dtype auto` is {auto}.",
        "",
        "| base dtype | accuracy before | accuracy after | eval loss before | eval loss after | train time, s "
        "| tokens/s | peak RSS, GB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for dtype, s in rows.items():
        acc = (100 * s[k].get("accuracy", float("nan")) for k in ("before", "after"))
        lines.append(
            f"| {dtype} | {next(acc):.1f}% | {next(acc):.1f}% | {s['before']['loss']:.4f} | {s['after']['loss']:.4f} "
            f"| {s['train_seconds']:.0f} | {s['tokens'] / s['train_seconds']:.0f} | {s['peak_rss_gb']:.2f} |"
        )
    f32, b16 = rows["float32"], rows["bfloat16"]
    lines.append(
        f"\nbf16 / fp32: train time {b16['train_seconds'] / f32['train_seconds']:.3f}×, peak RSS "
        f"{b16['peak_rss_gb'] / f32['peak_rss_gb']:.3f}×.\n\nCommand: `{display_command()}`"
    )
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        write_docs(DOC, table, "<!-- bench_dtype:begin -->", "<!-- bench_dtype:end -->")


if __name__ == "__main__":
    main()
