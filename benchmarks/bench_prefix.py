"""The prefix cache of `lorakit serve`: a multi-turn chat with a long system prompt, and a burst of requests behind
a new one, with the cache and without.

Two real servers on the default model, one with the default prefix cache and one with `--prefix-cache-mb 0`.
Each round holds, on each server in alternating order:
- a chat: one conversation of `--turns` turns behind a system prompt of about `--system-words` words (the same in
  every round, as a deployment's system prompt is) with each round's own questions. Every turn sends the whole
  conversation so far, as chat clients do;
- a burst: `--burst` users sending one question each at the same moment, behind a system prompt no request has
  sent before (the round's number in front of the same words), so nothing of it is cached when they arrive.
Answers are streamed (greedy, exactly `--max-tokens` tokens: `ignore_eos`); each records the time to the first
token and to the last. Reported: the medians over the measured rounds (a warm-up round on each server first),
their ratios, and the prompt tokens reported as cached (usage.prompt_tokens_details.cached_tokens).

    .venv/bin/python benchmarks/bench_prefix.py                   # 1,000-word system prompt, 4 turns, 16 tokens,
                                                                  # bursts of 8
    .venv/bin/python benchmarks/bench_prefix.py --write-docs      # also update docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import KEY, chat_stream, start_server, stop_server  # noqa: E402

DOCS = Path("docs") / "benchmarks.md"
START, END = "<!-- bench_prefix:start -->", "<!-- bench_prefix:end -->"
TOPICS = ["rivers", "mountains", "deserts", "islands", "forests", "lakes", "volcanoes", "glaciers"]
ASKS = ["Name one of the {t} you know.", "Why is it famous?", "How big is it?", "Who lives near it?"]


def turn(client: httpx.Client, messages: list[dict], max_tokens: int) -> tuple[float, float, str, dict]:
    """Stream one chat answer: (seconds to the first token, seconds to the end, text, usage)."""
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first, parts, usage = None, [], {}
    for chunk in chat_stream(client, body):
        if chunk.get("usage"):
            usage = chunk["usage"]
        for c in chunk.get("choices", []):
            text = c["delta"].get("content")
            if text:
                first = first or time.perf_counter() - t0
                parts.append(text)
    return first or time.perf_counter() - t0, time.perf_counter() - t0, "".join(parts), usage


def conversation(url: str, system: str, topic: str, args) -> list[tuple[float, float, int, int]]:
    """One conversation: per turn (first token s, total s, prompt tokens, cached tokens)."""
    messages = [{"role": "system", "content": system}]
    out = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=900) as client:
        for ask in ASKS[: args.turns]:
            messages.append({"role": "user", "content": ask.format(t=topic)})
            first, total, text, usage = turn(client, messages, args.max_tokens)
            details = usage.get("prompt_tokens_details") or {}
            out.append((first, total, usage["prompt_tokens"], details.get("cached_tokens", 0)))
            messages.append({"role": "assistant", "content": text})
    return out


def burst(url: str, system: str, args) -> tuple[float, list[tuple[float, float, int, int]]]:
    """`args.burst` chats sent at once, one question each: (seconds until all ended, per request (first token s,
    total s, prompt tokens, cached tokens))."""

    def one(i: int) -> tuple[float, float, int, int]:
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": ASKS[0].format(t=TOPICS[i % len(TOPICS)])},
        ]
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=900) as client:
            first, total, _, usage = turn(client, messages, args.max_tokens)
        details = usage.get("prompt_tokens_details") or {}
        return first, total, usage["prompt_tokens"], details.get("cached_tokens", 0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.burst) as pool:
        out = list(pool.map(one, range(args.burst)))
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--system-words", type=int, default=1000, help="words of the system prompt (default: 1000)"
    )
    p.add_argument("--turns", type=int, default=4, choices=range(1, len(ASKS) + 1), help="turns (default: 4)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per answer (default: 16)")
    p.add_argument("--burst", type=int, default=8, help="requests sent at once in a burst (default: 8)")
    p.add_argument("--rounds", type=int, default=3, help="measured conversations per server (default: 3)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the servers (default: torch's default)")
    p.add_argument("--model", help="HF folder or .gguf file (default: lorakit's default model)")
    p.add_argument("--write-docs", action="store_true", help=f"update the section of {DOCS}")
    args = p.parse_args(argv)
    args.max_batch = 8
    text = (
        "You are the assistant of a geography school. Answer in one or two plain sentences, name places exactly, "
        "and say so when you are not sure. "
    )
    system = " ".join((text * (args.system_words // 20 + 1)).split()[: args.system_words])
    load_avg = os.getloadavg()[0]
    results: dict[str, list[list[tuple]]] = {"cache": [], "off": []}
    bursts: dict[str, list[tuple]] = {"cache": [], "off": []}
    with tempfile.TemporaryDirectory() as tmp:
        servers = {}
        try:
            servers["cache"] = start_server(args, [], Path(tmp) / "cache.log")
            servers["off"] = start_server(args, [], Path(tmp) / "off.log", ["--prefix-cache-mb", "0"])
            for r in range(args.rounds + 1):  # round 0: warm-up
                order = ["cache", "off"] if r % 2 == 0 else ["off", "cache"]
                for label in order:
                    convo = conversation(servers[label][1], system, TOPICS[r % len(TOPICS)], args)
                    if r:
                        results[label].append(convo)
                    print(
                        f"round {r} {label}: "
                        + ", ".join(f"{f:.2f}/{t:.2f}s ({c}/{n})" for f, t, n, c in convo)
                    )
                    fresh = f"Session {r} ({label}). {system}"  # a system prompt no request has sent before
                    wall, each = burst(servers[label][1], fresh, args)
                    if r:
                        bursts[label].append((wall, each))
                    print(
                        f"round {r} {label} burst: {wall:.2f}s; "
                        + ", ".join(f"{f:.2f}/{t:.2f}s ({c}/{n})" for f, t, n, c in each)
                    )
        finally:
            for proc, _ in servers.values():
                stop_server(proc)
    section = report(args, results, bursts, (load_avg, os.getloadavg()[0]))
    print(section)
    if args.write_docs:
        from lorakit.bench import write_docs

        write_docs(DOCS, section, START, END)
        print(f"\nwrote the bench_prefix section of {DOCS}")
    return 0


def report(args, results: dict[str, list[list[tuple]]], bursts: dict[str, list[tuple]], load_avg) -> str:
    import torch

    def med(label: str, t: int, field: int) -> float:
        return statistics.median(c[t][field] for c in results[label])

    def whole(label: str) -> float:
        return statistics.median(sum(x[1] for x in c) for c in results[label])

    command = "benchmarks/bench_prefix.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    rows = []
    for t in range(args.turns):
        fc, fo = med("cache", t, 0), med("off", t, 0)
        prompt = results["cache"][0][t][2]
        cached = ", ".join(str(c[t][3]) for c in results["cache"])
        rows.append(f"| {t + 1} | {prompt} | {cached} | {fc:.2f} | {fo:.2f} | {fc / fo:.2f}x |")
    wc, wo = whole("cache"), whole("off")

    def burst_med(label: str, pick) -> float:
        return statistics.median(pick(wall, each) for wall, each in bursts[label])

    burst_rows = []
    for name, pick in (
        ("first token, median over the requests", lambda w, e: statistics.median(x[0] for x in e)),
        ("first token, the last request's", lambda w, e: max(x[0] for x in e)),
        ("all answers done", lambda w, e: w),
    ):
        c, o = burst_med("cache", pick), burst_med("off", pick)
        burst_rows.append(f"| {name} | {c:.2f} | {o:.2f} | {c / o:.2f}x |")
    cached = sorted({x[3] for _, each in bursts["cache"] for x in each})
    prompts = sorted({x[2] for _, each in bursts["cache"] for x in each})
    span = f"{prompts[0]}" if len(prompts) == 1 else f"{prompts[0]} to {prompts[-1]}"
    return "\n".join(
        [
            "## `lorakit serve`: the prefix cache on a multi-turn chat",
            "",
            f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
            f"1-minute load average before / after: {load_avg[0]:.2f} / {load_avg[1]:.2f}",
            f"- command: `.venv/bin/python {command.strip()}`",
            f"- setup: {args.model or 'SmolLM2-135M-Instruct'}, a {args.system_words}-word system prompt, "
            f"{args.turns} turns of {args.max_tokens} tokens each (greedy, `ignore_eos`), streamed; two servers "
            f"(default prefix cache, and `--prefix-cache-mb 0`), {args.rounds} conversations on each after a "
            "warm-up, alternating; every turn sends the whole conversation so far",
            "",
            "| turn | prompt tokens | cached tokens, each round | first token, cache (s) | first token, no "
            "cache (s) | ratio |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            f"A whole conversation took {wc:.2f} s with the cache and {wo:.2f} s without: {wc / wo:.2f}x. The "
            "first turn finds the system prompt cached by the conversation before it (the same system prompt in "
            "every round); later turns find the whole conversation so far.",
            "",
            f"A burst: {args.burst} requests sent at the same moment, each one question behind a system prompt no "
            f"request had sent before ({span} prompt tokens; medians over "
            f"{args.rounds} bursts on each server):",
            "",
            "| seconds | cache | no cache | ratio |",
            "|---|---|---|---|",
            *burst_rows,
            "",
            f"Cached tokens per request with the cache, over every burst: {', '.join(map(str, cached))}.",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
