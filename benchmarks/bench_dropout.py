"""Benchmark: the cost of LoRA dropout in the fused path.

1. Drawing one keep mask for a 1024×576 input (batch 4×256, SmolLM2's width): torch's ``bernoulli_`` against
   ``lorakit.dropout.dropout_keep`` (median of 50 draws each, interleaved).
2. One training step of the default model (batch 4×256, r=16 on 7 projections, fused path, chunked loss) at
   dropout 0 and 0.05, alternating in one process: median of ``--steps`` steps each after a warm-up.

    .venv/bin/python benchmarks/bench_dropout.py [--steps 3] [--write-docs]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

import lorakit
from lorakit.bench import TARGETS, cpu_name, display_command, version, write_docs
from lorakit.dropout import dropout_keep
from lorakit.head import causal_lm_loss

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
START, END = "<!-- bench_dropout:start -->", "<!-- bench_dropout:end -->"


def mask_times(n: int = 50) -> tuple[float, float]:
    shape, p = torch.Size([1024, 576]), 0.05
    gen = torch.Generator().manual_seed(0)
    ours, theirs = [], []
    for i in range(n + 5):
        t0 = time.perf_counter()
        torch.empty(shape).bernoulli_(1 - p, generator=gen)
        t1 = time.perf_counter()
        dropout_keep(i, shape, p)
        t2 = time.perf_counter()
        if i >= 5:
            theirs.append(t1 - t0)
            ours.append(t2 - t1)
    return statistics.median(theirs), statistics.median(ours)


def step_times(steps: int) -> dict[float, float]:
    torch.manual_seed(0)
    models = {}
    for p in (0.0, 0.05):
        model, _ = lorakit.load_model()
        lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=16, dropout=p, targets=TARGETS))
        model.train()
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
        models[p] = (model, opt)
    ids = torch.randint(0, 49152, (4, 256), generator=torch.Generator().manual_seed(1))

    def step(p: float) -> float:
        model, opt = models[p]
        t0 = time.perf_counter()
        causal_lm_loss(model, {"input_ids": ids, "labels": ids}).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for p in models:
        step(p)  # warm-up
    times: dict[float, list[float]] = {p: [] for p in models}
    for _ in range(steps):
        for p in models:
            times[p].append(step(p))
    return {p: statistics.median(t) for p, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()[0]
    bern, ours = mask_times()
    steps = step_times(args.steps)
    table = "\n".join(
        [
            "| measure | figure |",
            "|---|---:|",
            f"| one 1024×576 mask, `bernoulli_` | {1e3 * bern:.2f} ms |",
            f"| one 1024×576 mask, `dropout_keep` | {1e3 * ours:.2f} ms ({bern / ours:.1f}× faster) |",
            f"| training step, dropout 0 | {steps[0.0]:.2f} s |",
            f"| training step, dropout 0.05 | {steps[0.05]:.2f} s (+{steps[0.05] - steps[0.0]:.2f} s) |",
        ]
    )
    print(table)
    if args.write_docs:
        section = "\n".join(
            [
                "## LoRA dropout in the fused path",
                "",
                f"- machine: {os.cpu_count()} CPUs ({cpu_name()}), torch {version('torch')}",
                f"- command: `{display_command()}`",
                f"- 1-minute load average before the run: {load_before:.2f}",
                "- setup: masks: median of 50 interleaved draws; steps: default model, batch 4 × 256, r=16 on 7 "
                f"projections, fused path and chunked loss, median of {args.steps} alternating steps each",
                "",
                table,
            ]
        )
        write_docs(DOCS, section, START, END)
        print(f"updated {DOCS}")


if __name__ == "__main__":
    main()
