"""Benchmark: does `torch.compile` pay for a LoRA training step on the CPU?

Each worker is a subprocess that loads the default model, injects r=16 on the seven projections and trains the
way `lorakit train` does (fused LoRA path, chunked LM-head loss, AdamW). The ``compile`` worker wraps the
backbone in ``torch.compile`` (inductor, default mode) first. Both time their first step (which, compiled,
includes tracing and building the C++ kernels) and then ``--steps`` steps. Rounds alternate the order of the two
workers; the step ratio is paired within each round: median [min–max].

Break-even is the number of steps after which the compiled run has saved its extra first-step time:
(compiled first step - eager first step) / (eager step - compiled step).

    .venv/bin/python benchmarks/bench_compile.py [--rounds 2] [--steps 5] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lorakit.bench import TARGETS, cpu_name, display_command, version, write_docs

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
START, END = "<!-- bench_compile:start -->", "<!-- bench_compile:end -->"


def worker(args: argparse.Namespace) -> dict:
    import torch

    import lorakit
    from lorakit.head import causal_lm_loss

    torch.manual_seed(0)
    model, _ = lorakit.load_model()
    lorakit.inject(model, lorakit.LoraConfig(r=args.r, alpha=args.r, targets=TARGETS))
    model.train()
    ids = torch.randint(
        0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)
    )
    batch = {"input_ids": ids, "labels": ids}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if args.worker == "compile":
        model.model = torch.compile(model.model)

    def step() -> float:
        start = time.perf_counter()
        loss = causal_lm_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    first = step()
    steps = [step() for _ in range(args.steps)]
    return {"worker": args.worker, "first_s": first, "step_s": statistics.median(steps), "steps_s": steps}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps after the first")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--worker", choices=["eager", "compile"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return
    load_before = os.getloadavg()[0]
    rounds = []
    for i in range(args.rounds):
        res = {}
        for w in ["eager", "compile"] if i % 2 == 0 else ["compile", "eager"]:
            cmd = [sys.executable, __file__, "--worker", w, *(argv if argv is not None else sys.argv[1:])]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            res[w] = json.loads(out.strip().splitlines()[-1])
            print(
                f"round {i + 1}: {w} first {res[w]['first_s']:.1f} s, step {res[w]['step_s']:.2f} s",
                flush=True,
            )
        rounds.append(res)
    med = {w: statistics.median(r[w]["step_s"] for r in rounds) for w in ("eager", "compile")}
    first = {w: statistics.median(r[w]["first_s"] for r in rounds) for w in ("eager", "compile")}
    ratios = [r["compile"]["step_s"] / r["eager"]["step_s"] for r in rounds]
    gain = med["eager"] - med["compile"]
    extra = first["compile"] - first["eager"]
    even = f"{extra / gain:.0f} steps" if gain > 0 else "never (no step-time gain)"
    table = "\n".join(
        [
            "| run | first step, s | step, s |",
            "|---|---:|---:|",
            f"| eager (lorakit default) | {first['eager']:.1f} | {med['eager']:.2f} |",
            f"| `torch.compile` | {first['compile']:.1f} | {med['compile']:.2f} |",
            "",
            f"- compiled / eager step time: {statistics.median(ratios):.3f}× [{min(ratios):.3f}–{max(ratios):.3f}]",
            f"- compile time (first step, compiled - eager): {extra:.0f} s; break-even after {even}",
        ]
    )
    print(table)
    if args.write_docs:
        section = "\n".join(
            [
                "## `torch.compile` of a LoRA training step",
                "",
                f"- machine: {os.cpu_count()} CPUs ({cpu_name()}), torch {version('torch')}, "
                f"transformers {version('transformers')}",
                f"- command: `{display_command()}`",
                f"- 1-minute load average before the run: {load_before:.2f}",
                f"- setup: default model, batch {args.batch} × {args.seq}, r={args.r} on 7 projections, fp32, fused "
                f"path and chunked loss; backbone wrapped in `torch.compile` (inductor, default mode); "
                f"{args.rounds} rounds, {args.steps} timed steps per worker after the first",
                "",
                table,
            ]
        )
        write_docs(DOCS, section, START, END)
        print(f"updated {DOCS}")


if __name__ == "__main__":
    main()
