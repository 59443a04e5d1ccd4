"""The prefix cache of `lorakit serve`: a multi-turn chat with a long system prompt, with the cache and without.

Two real servers on the default model, one with the default prefix cache and one with `--prefix-cache-mb 0`.
Each round holds one conversation of `--turns` turns on each server, in alternating order: a system prompt of
about `--system-words` words (the same in every round, as a deployment's system prompt is) and each round's own
questions. Every turn sends the whole conversation so far, as chat clients do, streams the answer (greedy,
exactly `--max-tokens` tokens: `ignore_eos`) and records the time to the first token and to the last. Reported:
the medians over the measured rounds (a warm-up round on each server first), their ratios, and the prompt tokens
each turn reported as cached (usage.prompt_tokens_details.cached_tokens).

    .venv/bin/python benchmarks/bench_prefix.py                   # 1,000-word system prompt, 4 turns, 16 tokens
    .venv/bin/python benchmarks/bench_prefix.py --write-docs      # also update docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
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
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first, parts, usage = None, [], {}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"request failed: {r.status_code} {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--system-words", type=int, default=1000, help="words of the system prompt (default: 1000)"
    )
    p.add_argument("--turns", type=int, default=4, choices=range(1, len(ASKS) + 1), help="turns (default: 4)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per answer (default: 16)")
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
        finally:
            for proc, _ in servers.values():
                stop_server(proc)
    section = report(args, results, (load_avg, os.getloadavg()[0]))
    print(section)
    if args.write_docs:
        from lorakit.bench import write_docs

        write_docs(DOCS, section, START, END)
        print(f"\nwrote the bench_prefix section of {DOCS}")
    return 0


def report(args, results: dict[str, list[list[tuple]]], load_avg) -> str:
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
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
