"""Benchmark: one LoRA training step, lorakit vs PEFT vs the frozen-base lower bound.

The implementation lives in the package (`lorakit.bench`) so that `lorakit bench` runs the same comparison on any
installed copy; this script is kept so that the commands recorded in docs/benchmarks.md keep working:

    .venv/bin/python benchmarks/bench_step.py [--write-docs] [--rounds N] [--model DIR] ...
"""

from __future__ import annotations

from lorakit.bench import main, peak_rss_gb, round_order, write_docs

__all__ = ["main", "peak_rss_gb", "round_order", "write_docs"]

if __name__ == "__main__":
    main()
