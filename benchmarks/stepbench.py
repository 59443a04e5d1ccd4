"""What the step benchmarks against a peer share (bench_classify.py, bench_dpo.py, bench_embed.py): a worker's
result from its step times, the rounds that interleave lorakit's and the peer's workers in rotating order, and the
table of their medians and ratios.

    rounds = interleave(LIBS, args.rounds, lambda lib: spawn(args, lib))
    lines = ratio_rows(rounds, "lorakit", "peft", time_format=".2f")
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable

from lorakit.bench import round_order, spread
from lorakit.bench_worker import hwm_gb, peak_rss_gb


def step_result(lib: str, times: list[float], reset: bool) -> dict:
    """A worker's answer: the median of its step times after the first (the warm-up), each of them, the process's
    peak RSS, and the timed steps' peak where the high-water mark could be reset after the warm-up (`reset`)."""
    timed = times[1:]
    return {
        "lib": lib,
        "step_s": statistics.median(timed),
        "steps_s": timed,
        "peak_rss_gb": peak_rss_gb(),
        "train_peak_gb": hwm_gb() if reset else None,
    }


def interleave(libs: tuple[str, ...], rounds: int, spawn: Callable[[str], dict]) -> list[dict[str, dict]]:
    """`rounds` rounds, each running every lib's worker once (`spawn(lib)`) in an order that rotates from round to
    round; each result is said on stderr as it comes."""
    out = []
    for i in range(rounds):
        res = {}
        for lib in round_order(list(libs), i):
            res[lib] = r = spawn(lib)
            print(
                f"round {i + 1} {lib:8s} step {r['step_s']:.3f} s, peak {r['peak_rss_gb']:.3f} GB, "
                f"timed steps' peak {r['train_peak_gb']} GB",
                file=sys.stderr,
                flush=True,
            )
        out.append(res)
    return out


def ratio_rows(rounds: list[dict[str, dict]], ours: str, peer: str, time_format: str = ".2f") -> list[str]:
    """The table's rows: step time, the process's peak RSS and the timed steps' (left out where a worker could not
    measure it), each the peer's and ours as median [min–max] over the rounds, and ours / the peer's per round."""
    lines = []
    for label, key, fmt in (
        ("step time, s", "step_s", time_format),
        ("peak RSS of the process, GB", "peak_rss_gb", ".2f"),
        ("peak RSS of the timed steps, GB", "train_peak_gb", ".2f"),
    ):
        if any(r[lib][key] is None for r in rounds for lib in (ours, peer)):
            continue
        theirs = [r[peer][key] for r in rounds]
        mine = [r[ours][key] for r in rounds]
        ratio = [a / b for a, b in zip(mine, theirs, strict=True)]
        lines.append(
            f"| {label} | {spread(theirs, fmt)} | {spread(mine, fmt)} | {spread(ratio, '.3f', '×')} |"
        )
    return lines
