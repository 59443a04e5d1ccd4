"""A collection of adapters served on demand: `lorakit serve --load-on-demand --max-adapters K` against all of them
loaded at start-up.

It saves `--adapters` random adapters (r=`--rank` on q_proj/v_proj of the default model) under one root, then sends
`--requests` completions over them from `--clients` concurrent clients, the adapter of each drawn from a Zipf law
(exponent `--zipf`: a few adapters are asked often, most rarely, as in a multi-tenant service). Two servers, one
after the other, get the same request sequence:

- preloaded: every adapter given with `--adapter` at start-up (no loads while serving, all resident);
- on demand: `--load-on-demand --max-adapters K`: at most K resident, loaded when first asked, least recently
  used evicted.

Reported per server: start-up time, errors, p50 / p95 latency (send to last byte), completion tokens/s, adapters
loaded while serving, and resident memory (RSS) at the end.

    .venv/bin/python benchmarks/bench_on_demand.py                  # 32 adapters, K=8, 4 clients, 160 requests
    .venv/bin/python benchmarks/bench_on_demand.py --write-docs     # also update docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import KEY, _quantile, start_server, stop_server  # noqa: E402
from random_adapters import save_random  # noqa: E402

DOCS = Path("docs") / "benchmarks.md"
START, END = "<!-- bench_on_demand:start -->", "<!-- bench_on_demand:end -->"
PROMPTS = ["The capital of France is", "Write a short poem about the sea:", "List three uses of a paperclip:"]


def make_adapters(model_spec: str | None, n: int, rank: int, root: Path) -> list[str]:
    """`n` random adapters saved as root/team{i}/a{i}: names with a '/', as a collection's often are."""

    import lorakit

    model, _ = lorakit.load_model(model_spec)
    names = [f"team{i % 4}/a{i}" for i in range(n)]
    config = lorakit.LoraConfig(r=rank, alpha=rank, targets=["q_proj", "v_proj"])
    save_random(model, [root / name for name in names], config, std=0.02)
    return names


def plan(names: list[str], requests: int, zipf: float, seed: int) -> list[str]:
    """The adapter of each request: name i drawn with weight 1 / (i + 1) ** zipf."""
    rng = random.Random(seed)
    weights = [1 / (i + 1) ** zipf for i in range(len(names))]
    return rng.choices(names, weights, k=requests)


async def send(url: str, order: list[str], clients: int, max_tokens: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {KEY}"}
    limits = httpx.Limits(max_connections=clients)
    queue: asyncio.Queue = asyncio.Queue()
    for i, name in enumerate(order):
        queue.put_nowait((i, name))
    results: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                i, name = queue.get_nowait()
                body = {"model": name, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens}
                body |= {"temperature": 0, "ignore_eos": True}
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/completions", json=body)
                    error = None if r.status_code == 200 else f"{r.status_code}: {r.text[:160]}"
                    tokens = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0
                except httpx.HTTPError as e:
                    error, tokens = f"{type(e).__name__}: {e}", 0
                results.append({"latency": time.perf_counter() - t0, "tokens": tokens, "error": error})

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
        health = (await client.get("/health")).json()
    lat = sorted(r["latency"] for r in results)
    errors = [r["error"] for r in results if r["error"]]
    return {
        "requests": len(results),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "p50": _quantile(lat, 0.50),
        "p95": _quantile(lat, 0.95),
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "loads": health.get("on_demand_loads", 0),
    }


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def serve(
    args: argparse.Namespace, root: Path, names: list[str], order: list[str], on_demand: bool, log: Path
):
    if on_demand:
        adapters, extra = [], ["--adapter-root", str(root), "--load-on-demand", "--max-adapters", str(args.k)]
    else:
        adapters, extra = [(n, root / n) for n in names], []
    t0 = time.perf_counter()
    proc, url = start_server(args, adapters, log, extra)
    started = time.perf_counter() - t0
    try:
        warm = {"prompt": PROMPTS[0], "max_tokens": 2}  # the base model: no adapter loaded for it
        httpx.post(
            f"{url}/v1/completions", json=warm, headers={"Authorization": f"Bearer {KEY}"}, timeout=600
        )
        run = asyncio.run(send(url, order, args.clients, args.max_tokens))
        run["rss"] = rss_mib(proc.pid)
    finally:
        stop_server(proc)
    return {
        "label": f"on demand, --max-adapters {args.k}" if on_demand else "preloaded",
        "startup": started,
        **run,
    }


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| server | start-up, s | requests | errors | p50 / p95 latency, s | tokens/s | loads while serving "
        "| RSS at the end, MiB |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['label']} | {r['startup']:.1f} | {r['requests']} | {r['errors']} | {r['p50']:.2f} / "
            f"{r['p95']:.2f} | {r['tokens_per_s']:.1f} | {r['loads']} | {r['rss']:.0f} |"
        )
    return "\n".join(out)


def report(args: argparse.Namespace, rows: list[dict[str, Any]], distinct: int, load_avg: tuple) -> str:
    import torch

    command = "benchmarks/bench_on_demand.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    pre, lazy = rows
    return "\n".join(
        [
            "## A collection of adapters on demand: `--load-on-demand --max-adapters K` against all preloaded",
            "",
            f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- machine: {os.cpu_count()} CPUs ({torch.backends.cpu.get_cpu_capability()}), Python "
            f"{platform.python_version()}, torch {torch.__version__}; 1-minute load average before / after: "
            f"{load_avg[0]:.2f} / {load_avg[1]:.2f} (the run's own processes count in the second)",
            f"- command: `.venv/bin/python {command.strip()}`",
            f"- setup: {args.adapters} adapters (r={args.rank}, q_proj/v_proj) on "
            f"{args.model or 'SmolLM2-135M-Instruct'}; {args.requests} completions ({args.max_tokens} tokens, "
            f"greedy) from {args.clients} concurrent clients, each request's adapter drawn from a Zipf law (exponent "
            f"{args.zipf:g}, seed {args.seed}): {distinct} distinct adapters asked; the same sequence for both "
            f"servers, one after the other; server --max-batch {args.max_batch}",
            "",
            table(rows),
            "",
            f"- On demand: {lazy['tokens_per_s'] / pre['tokens_per_s']:.2f}x the tokens/s of preloaded, p95 latency "
            f"{lazy['p95'] / pre['p95']:.2f}x, start-up {lazy['startup'] / pre['startup']:.2f}x, RSS "
            f"{lazy['rss'] / pre['rss']:.2f}x, with {lazy['loads']} loads while serving and {lazy['errors']} "
            "errors.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--k", type=int, default=8, help="--max-adapters of the on-demand server (default: 8)")
    p.add_argument("--requests", type=int, default=160)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=8, help="the servers' --max-batch (default: 8)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the servers (default: torch's default)")
    p.add_argument("--model", help="HF folder or .gguf file (default: lorakit's default model)")
    p.add_argument("--write-docs", action="store_true", help=f"update the section of {DOCS}")
    args = p.parse_args(argv)
    load_avg = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "adapters"
        names = make_adapters(args.model, args.adapters, args.rank, root)
        order = plan(names, args.requests, args.zipf, args.seed)
        rows = [
            serve(args, root, names, order, lazy, Path(tmp) / f"server{lazy}.log") for lazy in (False, True)
        ]
    for r in rows:
        if r["first_error"]:
            print(f"first error ({r['label']}): {r['first_error']}", file=sys.stderr)
    section = report(args, rows, len(set(order)), (load_avg, os.getloadavg()[0]))
    print(section)
    if args.write_docs:
        from lorakit.bench import write_docs

        write_docs(DOCS, section, START, END)
        print(f"\nwrote the bench_on_demand section of {DOCS}")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
