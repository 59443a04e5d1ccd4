"""Step time of `lorakit bench`'s variants alternating step by step in one process.

`lorakit bench` runs each variant in its own process, a round of a few steps at a time, so that each one's peak
memory is its own. On a VM whose speed drifts over minutes, a round of one variant and the next one's round can
run at different speeds. Here every variant is built once in one process (with `lorakit bench`'s own setups and
step), and the rounds alternate single steps, each round in a rotated order, so a slow spell hits every variant
alike. It measures time only: the variants share one process, so their memory cannot be told apart (`lorakit
bench` measures it). Ratios are the first variant's step against each other's in the same round: median [range].

    .venv/bin/python benchmarks/bench_interleaved.py [--variants lorakit peft bound] [--rounds 8] [--write-docs]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from lorakit.bench import (  # noqa: E402
    LABELS,
    VARIANTS,
    cpu_name,
    display_command,
    round_order,
    spread,
    torch_capability,
    write_docs,
)

DOC = ROOT / "docs" / "performance.md"


def measure(steps: dict, rounds: int) -> list[dict[str, float]]:
    """`rounds` rounds of one step of every variant, in `lorakit bench`'s rotating order: seconds a step."""
    out = []
    for i in range(rounds):
        times = {}
        for name in round_order(list(steps), i):
            t0 = time.perf_counter()
            steps[name]()
            times[name] = time.perf_counter() - t0
        out.append(times)
        print(f"round {i + 1}/{rounds}: " + ", ".join(f"{n} {t:.3f} s" for n, t in times.items()), flush=True)
    return out


def table(rounds: list[dict[str, float]], args) -> str:
    first, others = args.variants[0], args.variants[1:]
    lines = [
        f"CPU: {cpu_name()} (torch capability {torch_capability()}), {args.threads} threads; default model, batch "
        f"{args.batch}x{args.seq}, r={args.r} on the seven projections, base {args.dtype}; {len(rounds)} rounds of "
        "one step of each variant, alternating in one process; median [range].",
        "",
        "| variant | step, s |",
        "|---|---:|",
        *(f"| {LABELS.get(n, n)} | {spread([r[n] for r in rounds], '.3f')} |" for n in args.variants),
        "",
        f"| ratio, per round | {LABELS.get(first, first)} / it | rounds where {first} is faster |",
        "|---|---:|---:|",
    ]
    for n in others:
        ratios = [r[first] / r[n] for r in rounds]
        faster = sum(x < 1 for x in ratios)
        lines.append(f"| {LABELS.get(n, n)} | {spread(ratios, '.3f', '×')} | {faster} of {len(ratios)} |")
    lines += ["", f"Command: `{display_command()}`"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--model", default=None)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--variants", nargs="+", default=["lorakit", "peft", "bound"], choices=VARIANTS)
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args()
    if args.rounds < 1 or len(set(args.variants)) < 2 or len(set(args.variants)) != len(args.variants):
        p.error("--rounds must be at least 1 and --variants must name two or more different variants")
    args.dropout, args.device = 0.0, "cpu"  # what the bench variants read
    from lorakit.bench_worker import in_process_steps

    text = table(measure(in_process_steps(args), args.rounds), args)
    print(text)
    if args.write_docs:
        marker = f"bench_interleaved:{args.dtype}"
        write_docs(DOC, text, f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->")


if __name__ == "__main__":
    main()
