"""`n` choices against `n` separate requests on `lorakit serve`: what the shared prefill saves.

One real server (bench_serve's) on the default model. Each round sends, in alternating order, (a) one completion
with `n` choices of a long prompt, and (b) `n` concurrent completions whose prompts differ only in their first
word, so that none shares a prefill: the same rows and decode steps, the prefill computed once against `n` times.
Greedy, exactly `--max-tokens` tokens per choice (`ignore_eos`). Reported: median wall time of each over the
rounds (send to last byte), the ratio, and the server's shared prefills.

    .venv/bin/python benchmarks/bench_choices.py                     # n=8, ~1,000-token prompt, 8 tokens
    .venv/bin/python benchmarks/bench_choices.py --write-docs        # also update docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import KEY, start_server, stop_server  # noqa: E402

DOCS = Path("docs") / "benchmarks.md"
START, END = "<!-- bench_choices:start -->", "<!-- bench_choices:end -->"
WORDS = ["Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot", "Golf", "Hotel", "India", "Juliet"]


async def timed(client: httpx.AsyncClient, bodies: list[dict]) -> float:
    t0 = time.perf_counter()
    answers = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
    wall = time.perf_counter() - t0
    for r in answers:
        if r.status_code != 200:
            raise SystemExit(f"request failed: {r.status_code} {r.text[:300]}")
    return wall


async def rounds(url: str, args: argparse.Namespace, prompt: str) -> dict[str, list[float]]:
    common = {"max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
    shared = [{"prompt": prompt, "n": args.n, **common}]
    separate = [{"prompt": f"{WORDS[i % len(WORDS)]} {i}. {prompt}", **common} for i in range(args.n)]
    times: dict[str, list[float]] = {"n": [], "separate": []}
    limits = httpx.Limits(max_connections=args.n + 2)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=900, limits=limits) as client:
        await timed(client, shared)  # warm-up, both shapes
        await timed(client, separate)
        for r in range(args.rounds):
            order = [("n", shared), ("separate", separate)]
            for label, bodies in order if r % 2 == 0 else order[::-1]:
                times[label].append(await timed(client, bodies))
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8, help="choices (and separate requests) per round (default: 8)")
    p.add_argument("--prompt-words", type=int, default=700, help="words of the prompt (default: 700)")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens per choice (default: 8)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the server (default: torch's default)")
    p.add_argument("--model", help="HF folder or .gguf file (default: lorakit's default model)")
    p.add_argument("--write-docs", action="store_true", help=f"update the section of {DOCS}")
    args = p.parse_args(argv)
    args.max_batch = max(8, args.n)  # every row in one batch, for both shapes
    text = "The quick brown fox jumps over the lazy dog near the river bank. "
    prompt = " ".join((text * (args.prompt_words // 12 + 1)).split()[: args.prompt_words])
    load_avg = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(args, [], Path(tmp) / "server.log")
        try:
            tokens = httpx.post(
                f"{url}/v1/completions",
                json={"prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 0},
                headers={"Authorization": f"Bearer {KEY}"},
                timeout=600,
            ).json()["usage"]["prompt_tokens"]
            before = httpx.get(f"{url}/health").json()["shared_prefills"]
            times = asyncio.run(rounds(url, args, prompt))
            shared = httpx.get(f"{url}/health").json()["shared_prefills"] - before
        finally:
            stop_server(proc)
    section = report(args, tokens, times, shared, (load_avg, os.getloadavg()[0]))
    print(section)
    if args.write_docs:
        from lorakit.bench import write_docs

        write_docs(DOCS, section, START, END)
        print(f"\nwrote the bench_choices section of {DOCS}")
    return 0


def report(args, tokens: int, times: dict[str, list[float]], shared: int, load_avg) -> str:
    import torch

    n, sep = statistics.median(times["n"]), statistics.median(times["separate"])
    command = "benchmarks/bench_choices.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    fmt = ", ".join
    return "\n".join(
        [
            "## `lorakit serve`: `n` choices share their prompt's prefill",
            "",
            f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
            f"1-minute load average before / after: {load_avg[0]:.2f} / {load_avg[1]:.2f}",
            f"- command: `.venv/bin/python {command.strip()}`",
            f"- setup: {args.model or 'SmolLM2-135M-Instruct'}, a {tokens}-token prompt, {args.max_tokens} tokens "
            f"per choice (greedy, `ignore_eos`), server --max-batch {args.max_batch}; {args.rounds} rounds, the "
            "two shapes alternating; wall time from send to the last answer",
            "",
            "| shape | wall time, median (s) | each round (s) |",
            "|---|---|---|",
            f"| one request, n={args.n} | {n:.2f} | {fmt(f'{t:.2f}' for t in times['n'])} |",
            f"| {args.n} requests, prompts differing in the first word | {sep:.2f} | "
            f"{fmt(f'{t:.2f}' for t in times['separate'])} |",
            "",
            f"`n` = {args.n} took {n / sep:.2f}x the time of {args.n} separate requests "
            f"({f'{sep / n:.1f}x faster' if n < sep else 'not faster'}); the server counted {shared} shared prefill rows over the "
            f"{args.rounds + 1} requests with n={args.n} (warm-up included): {shared / (args.rounds + 1):g} per "
            f"request, one forward for {args.n} rows.",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
