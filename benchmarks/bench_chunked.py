"""Chunked prefill in `lorakit serve`: how long answers already streaming pause while a long prompt arrives.

Two real servers on the default model, one with the default `--prefill-chunk 512` and one with `--prefill-chunk 0`
(whole prompts at once); both without a prefix cache (`--prefix-cache-mb 0`), so that every round computes the
long prompt afresh. Each round, on each server in alternating order: `--streams` chat answers start (greedy,
exactly `--stream-tokens` tokens: `ignore_eos`); once each has streamed a few tokens, a request with a long
prompt (a system prompt of about `--long-words` words) arrives and asks for `--long-tokens` tokens. Recorded: each
stream's longest pause between two tokens, and the long request's time to its first token; then, with nothing
streaming, the same long request's time to its first token again (the engine prefills whole prompts while nothing
decodes). Reported: medians over the measured rounds (a warm-up round on each server first) and their ratios.

    .venv/bin/python benchmarks/bench_chunked.py                  # 4 streams, a 1,600-word prompt
    .venv/bin/python benchmarks/bench_chunked.py --write-docs     # also update docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import KEY, chat_stream, start_server, stop_server  # noqa: E402

DOCS = Path("docs") / "benchmarks.md"
START, END = "<!-- bench_chunked:start -->", "<!-- bench_chunked:end -->"
WARM_TOKENS = 4
"""Tokens each stream has sent before the long prompt is sent."""


def stream(url: str, messages: list[dict], max_tokens: int, started: threading.Event | None) -> list[float]:
    """Stream one chat answer; the times (perf_counter) at which its tokens came. Sets `started` after WARM_TOKENS
    tokens."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    times: list[float] = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=900) as client:
        for chunk in chat_stream(client, body):
            if any(c["delta"].get("content") for c in chunk.get("choices", [])):
                times.append(time.perf_counter())
                if started is not None and len(times) == WARM_TOKENS:
                    started.set()
    return times


def one_round(url: str, long_prompt: str, args) -> tuple[list[float], float, float]:
    """Each stream's longest pause (s), the long request's time to its first token (s), and that time again with
    nothing streaming (s)."""
    starts = [threading.Event() for _ in range(args.streams)]
    with ThreadPoolExecutor(args.streams + 1) as pool:
        futures = [
            pool.submit(
                stream,
                url,
                [{"role": "user", "content": f"Count from {i} to {i + 200}."}],
                args.stream_tokens,
                e,
            )
            for i, e in enumerate(starts)
        ]
        for e, f in zip(starts, futures, strict=True):
            while not e.wait(0.1):
                if f.done():
                    f.result()  # raises what failed the stream
                    raise RuntimeError("a stream ended before the long prompt was sent")
        t0 = time.perf_counter()
        messages = [
            {"role": "system", "content": long_prompt},
            {"role": "user", "content": "Summarise that."},
        ]
        long = pool.submit(stream, url, messages, args.long_tokens, None)
        first = long.result()[0] - t0
        pauses = [max(b - a for a, b in zip(f.result(), f.result()[1:], strict=False)) for f in futures]
    t0 = time.perf_counter()
    alone = stream(url, messages, args.long_tokens, None)[0] - t0
    return pauses, first, alone


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=4, help="answers streaming when the long prompt comes (4)")
    p.add_argument("--stream-tokens", type=int, default=48, help="tokens of each stream (default: 48)")
    p.add_argument("--long-words", type=int, default=1600, help="words of the long prompt (default: 1600)")
    p.add_argument("--long-tokens", type=int, default=4, help="tokens the long request asks for (default: 4)")
    p.add_argument(
        "--chunk", type=int, default=512, help="--prefill-chunk of the chunked server (default: 512)"
    )
    p.add_argument("--rounds", type=int, default=3, help="measured rounds per server (default: 3)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the servers (default: torch's default)")
    p.add_argument("--model", help="HF folder or .gguf file (default: lorakit's default model)")
    p.add_argument("--write-docs", action="store_true", help=f"update the section of {DOCS}")
    args = p.parse_args(argv)
    args.max_batch = 8
    text = "The history of the river valley, its towns, bridges, mills and floods, told year by year. "
    long_prompt = " ".join((text * (args.long_words // 15 + 1)).split()[: args.long_words])
    load_avg = os.getloadavg()[0]
    results: dict[str, list[tuple[list[float], float, float]]] = {"chunked": [], "whole": []}
    with tempfile.TemporaryDirectory() as tmp:
        servers = {}
        try:
            off = ["--prefix-cache-mb", "0"]
            servers["chunked"] = start_server(
                args, [], Path(tmp) / "chunked.log", [*off, "--prefill-chunk", str(args.chunk)]
            )
            servers["whole"] = start_server(args, [], Path(tmp) / "whole.log", [*off, "--prefill-chunk", "0"])
            for r in range(args.rounds + 1):  # round 0: warm-up
                for label in ["chunked", "whole"] if r % 2 == 0 else ["whole", "chunked"]:
                    pauses, first, alone = one_round(servers[label][1], long_prompt, args)
                    if r:
                        results[label].append((pauses, first, alone))
                    print(
                        f"round {r} {label}: pauses {', '.join(f'{x:.2f}' for x in pauses)} s; first {first:.2f} s; "
                        f"alone {alone:.2f} s"
                    )
        finally:
            for proc, _ in servers.values():
                stop_server(proc)
    section = report(args, results, (load_avg, os.getloadavg()[0]))
    print(section)
    if args.write_docs:
        from lorakit.bench import write_docs

        write_docs(DOCS, section, START, END)
        print(f"\nwrote the bench_chunked section of {DOCS}")
    return 0


def report(args, results, load_avg) -> str:
    import torch

    def med(label: str, pick) -> float:
        return statistics.median(pick(*result) for result in results[label])

    rows = []
    for name, pick in (
        ("longest pause of a stream, median over the streams", lambda p, f, a: statistics.median(p)),
        ("longest pause of any stream", lambda p, f, a: max(p)),
        ("the long prompt's first token", lambda p, f, a: f),
        ("the long prompt's first token, nothing streaming", lambda p, f, a: a),
    ):
        c, w = med("chunked", pick), med("whole", pick)
        rows.append(f"| {name} | {c:.2f} | {w:.2f} | {c / w:.2f}x |")
    command = "benchmarks/bench_chunked.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return "\n".join(
        [
            "## `lorakit serve`: chunked prefill, streams paused by a long prompt",
            "",
            f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
            f"1-minute load average before / after: {load_avg[0]:.2f} / {load_avg[1]:.2f}",
            f"- command: `.venv/bin/python {command.strip()}`",
            f"- setup: {args.model or 'SmolLM2-135M-Instruct'}, {args.streams} chat answers streaming "
            f"{args.stream_tokens} tokens each (greedy, `ignore_eos`) when a request with a {args.long_words}-word "
            f"system prompt arrives (asking for {args.long_tokens} tokens); two servers without a prefix cache, "
            f"`--prefill-chunk {args.chunk}` and `--prefill-chunk 0` (whole prompts), {args.rounds} rounds on each "
            "after a warm-up, alternating; then the long request again with nothing streaming; medians over the "
            "rounds",
            "",
            f"| seconds | chunks of {args.chunk} | whole prompts | ratio |",
            "|---|---|---|---|",
            *rows,
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
