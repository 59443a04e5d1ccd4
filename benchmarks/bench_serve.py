"""Load test of `lorakit serve` on loopback: many concurrent requests spread over several adapters.

It makes `--adapters` random LoRA adapters (r=16 on q_proj/v_proj of the default model), starts the real server
in a subprocess, sends one warm-up request per adapter, then `--requests` completions with at most
`--concurrency` in flight, round-robin over the adapters, each generating exactly `--max-tokens` tokens
(greedy, `ignore_eos`). Reported: errors, latency p50/p95 (send to last byte), completion tokens/s over the
wall time of the run, and the server's batching (decode steps, rows per step). `--sequential N` first sends N
requests one at a time for the unbatched baseline.

    .venv/bin/python benchmarks/bench_serve.py                       # 200 requests, 8 concurrent, 4 adapters
    .venv/bin/python benchmarks/bench_serve.py --write-docs          # also update docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

DOCS = Path("docs") / "benchmarks.md"
START, END = "<!-- bench_serve:start -->", "<!-- bench_serve:end -->"
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea:",
    "List three uses of a paperclip:",
    "Explain what a neural network is in one sentence:",
    "Once upon a time, in a small village,",
]
KEY = "sk-bench"


def make_adapters(model_spec: str | None, n: int, out: Path) -> list[tuple[str, Path]]:
    import torch

    import lorakit

    model, _ = lorakit.load_model(model_spec)
    made = []
    for i in range(n):
        name = f"lora{i}"
        torch.manual_seed(i)
        lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=16, targets=["q_proj", "v_proj"]), name=name)
        with torch.no_grad():
            for p in lorakit.adapter_parameters(model, name):
                p.add_(torch.randn_like(p) * 0.02)
        made.append((name, lorakit.save_adapter(model, out / name, name)))
    return made


def start_server(
    args: argparse.Namespace, adapters: list[tuple[str, Path]], log: Path, extra: list[str] | None = None
) -> tuple[subprocess.Popen, str]:
    """`lorakit serve` on a free port with `args`' model, batch and threads, plus `extra` options; waits until
    /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lorakit", "serve", "--port", str(port), "--api-key", KEY]
    cmd += ["--max-batch", str(args.max_batch)] + (["--model", args.model] if args.model else [])
    for name, path in adapters:
        cmd += ["--adapter", f"{name}={path}"]
    cmd += extra or []
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"the server did not come up in 180 s:\n{log.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    """Ctrl-C's twin (SIGTERM: requests in flight get 5 s), then a kill if it takes longer than 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def chat_stream(client: httpx.Client, body: dict[str, Any]):
    """The chunks (parsed JSON) of one streamed chat completion; RuntimeError on an HTTP error or an error event."""
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"request failed: {r.status_code} {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"request failed: {chunk['error']}")
            yield chunk


async def one(
    client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    body.update(extra or {})
    t0 = time.perf_counter()
    try:
        r = await client.post("/v1/completions", json=body)
        ok = r.status_code == 200
        tokens = r.json()["usage"]["completion_tokens"] if ok else 0
        error = None if ok else f"{r.status_code}: {r.text[:200]}"
    except httpx.HTTPError as e:
        tokens, error = 0, f"{type(e).__name__}: {e}"
    return {"latency": time.perf_counter() - t0, "tokens": tokens, "error": error}


async def load(
    url: str,
    names: list[str],
    requests: int,
    concurrency: int,
    max_tokens: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:
        gate = asyncio.Semaphore(concurrency)

        async def job(i: int) -> dict[str, Any]:
            async with gate:
                return await one(client, names[i % len(names)], PROMPTS[i % len(PROMPTS)], max_tokens, extra)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(job(i) for i in range(requests)))
        wall = time.perf_counter() - t0
    lat = sorted(r["latency"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    errors = [r["error"] for r in results if r["error"]]
    return {
        "requests": requests,
        "concurrency": concurrency,
        "errors": len(errors),
        "first_errors": errors[:3],
        "p50": _quantile(lat, 0.50),
        "p95": _quantile(lat, 0.95),
        "wall": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "requests_per_s": requests / wall,
    }


def _quantile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[round(q * 100) - 1]


def batching(before: dict[str, Any], after: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """The server's decode steps during a run and the rows per step (a request's first token is its prefill's)."""
    steps = after["steps"] - before["steps"]
    return {"steps": steps, "rows_per_step": (run["tokens"] - run["requests"]) / max(steps, 1)}


def table(runs: list[dict[str, Any]]) -> str:
    rows = [
        "| run | requests | concurrent | errors | p50 latency, s | p95 latency, s | tokens/s | requests/s "
        "| decode steps | rows per step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        rows.append(
            f"| {r['label']} | {r['requests']} | {r['concurrency']} | {r['errors']} | {r['p50']:.2f} | "
            f"{r['p95']:.2f} | {r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | {r['steps']} "
            f"| {r['rows_per_step']:.1f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request (default: 16)")
    p.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch (default: 8)")
    p.add_argument("--sequential", type=int, default=16, help="requests sent one at a time first (0: none)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the server (default: torch's default)")
    p.add_argument("--model", help="HF folder or .gguf file (default: lorakit's default model)")
    p.add_argument(
        "--extra",
        type=json.loads,
        default={},
        help='JSON fields added to every request, e.g. \'{"frequency_penalty": 0.5, "logprobs": 5}\'',
    )
    p.add_argument("--write-docs", action="store_true", help=f"update the section of {DOCS}")
    args = p.parse_args(argv)
    load_avg = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(args.model, args.adapters, Path(tmp))
        names = [n for n, _ in adapters]
        proc, url = start_server(args, adapters, Path(tmp) / "server.log")
        try:
            asyncio.run(load(url, names, len(names), len(names), args.max_tokens, args.extra))  # warm-up
            runs = []
            plan = [("one at a time", args.sequential, 1), ("concurrent", args.requests, args.concurrency)]
            for label, requests, concurrency in plan:
                if requests:
                    before = httpx.get(f"{url}/health").json()
                    run = asyncio.run(load(url, names, requests, concurrency, args.max_tokens, args.extra))
                    runs.append(
                        {"label": label, **run, **batching(before, httpx.get(f"{url}/health").json(), run)}
                    )
        finally:
            stop_server(proc)
    for r in runs:
        for e in r["first_errors"]:
            print(f"error ({r['label']}): {e}", file=sys.stderr)
    section = report(args, runs, (load_avg, os.getloadavg()[0]))
    print(section)
    if args.write_docs:
        from lorakit.bench import write_docs

        write_docs(DOCS, section, START, END)
        print(f"\nwrote the bench_serve section of {DOCS}")
    return 1 if any(r["errors"] for r in runs) else 0


def report(args: argparse.Namespace, runs: list[dict[str, Any]], load_avg: tuple[float, float]) -> str:
    import torch

    command = "benchmarks/bench_serve.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        "## `lorakit serve`: load test on loopback",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}; "
        f"1-minute load average before / after the run: {load_avg[0]:.2f} / {load_avg[1]:.2f} (the run's own "
        "processes count in the second)",
        f"- command: `.venv/bin/python {command.strip()}`",
        f"- setup: {args.adapters} adapters (r=16, q_proj/v_proj) on {args.model or 'SmolLM2-135M-Instruct'}, "
        f"round-robin; /v1/completions, greedy, exactly {args.max_tokens} tokens each (`ignore_eos`); server "
        f"--max-batch {args.max_batch}, threads: {args.threads or 'torch default'}; latency is send to last byte"
        + (f"; every request also sends {json.dumps(args.extra)}" if args.extra else ""),
        "",
        table(runs),
    ]
    if len(runs) == 2:
        speedup = runs[1]["tokens_per_s"] / runs[0]["tokens_per_s"]
        lines += [
            "",
            f"Requests for different adapters share decode steps (mixed-adapter batches): {speedup:.1f}x the "
            f"tokens/s of one request at a time, with {runs[1]['errors']} errors.",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
