"""Updating a served adapter while its requests run: vLLM's `load_inplace` against unloading and loading again.

An RL loop syncs its policy adapter into the server after every step while rollouts stream from it. This starts the
real `lorakit serve` on loopback with one adapter `pol` (r=16 on every linear layer of the default model, random
weights) and two versions of its file, v0 and v1. `--clients` clients stream completions from `pol` without pause
(greedy, exactly `--max-tokens` tokens each; their first requests `--stagger` s apart; after an error a client waits
`--retry` s), while a syncer loads the other version every `--every` seconds. Three phases of `--seconds` each,
interleaved over `--rounds` rounds:

- steady: no syncing, the reference for throughput and token gaps;
- in place: `/v1/load_lora_adapter` with `"load_inplace": true`;
- unload + load: `/v1/unload_lora_adapter`, then `/v1/load_lora_adapter` (what a server without in-place loading
  offers): requests that arrive in between fail with 404.

Reported per phase: requests, errors, completion tokens/s, the gaps between streamed tokens (p50, p99, max: a sync
pauses decoding while the engine thread reads the file and builds the adapter), and how long a sync takes (its HTTP
calls, send to answer). That a running answer keeps its version, and the next gets the new one, is for the tests to
check exactly (tests/test_serve.py::test_load_inplace_while_in_flight, tests/test_bank_replace.py): the greedy
tokens that follow an ignored end-of-sequence are near ties, which batching's float rounding may flip, so a
comparison of whole answers here would count noise.

    .venv/bin/python benchmarks/bench_inplace.py                      # 4 clients, 24 tokens, a sync every 2 s
    .venv/bin/python benchmarks/bench_inplace.py --write-docs         # also update docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import KEY, start_server, stop_server  # noqa: E402
from random_adapters import save_random  # noqa: E402

DOCS = Path("docs") / "benchmarks.md"
START, END = "<!-- bench_inplace:start -->", "<!-- bench_inplace:end -->"
PROMPTS = ["The capital of France is", "Write a short poem about the sea:", "List three uses of a paperclip:"]
PHASES = ("steady", "in place", "unload + load")


def make_versions(model_spec: str | None, rank: int, out: Path) -> list[Path]:
    """Two versions of one adapter's file (random weights, r=`rank` on every linear layer): out/v0, out/v1."""

    import lorakit

    model, _ = lorakit.load_model(model_spec)
    config = lorakit.LoraConfig(r=rank, alpha=rank, targets="all-linear")
    return save_random(model, [out / "v0", out / "v1"], config, std=0.01)


async def stream(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One streamed completion from `pol`: its text, the arrival time of each chunk, or its error."""
    body = {"model": "pol", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    body["stream"] = True
    times, parts, error = [], [], None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                error = f"{r.status_code}: {(await r.aread())[:160]!r}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        error = f"error event: {chunk['error']}"
                        break
                    if chunk["choices"] and chunk["choices"][0]["text"]:
                        times.append(time.perf_counter())
                        parts.append(chunk["choices"][0]["text"])
    except httpx.HTTPError as e:
        error = f"{type(e).__name__}: {e}"
    return {"prompt": prompt, "text": "".join(parts), "times": times, "error": error}


async def post(client: httpx.AsyncClient, route: str, body: dict[str, Any]) -> None:
    r = await client.post(route, json=body)
    if r.status_code != 200:
        raise SystemExit(f"{route} {body} failed: {r.status_code} {r.text[:300]}")


async def phase(
    client: httpx.AsyncClient, kind: str, versions: list[str], args: argparse.Namespace, state: dict[str, int]
) -> dict[str, Any]:
    """`args.clients` streaming clients for `args.seconds`, and a syncer of kind `kind`."""
    stop_at = time.perf_counter() + args.seconds
    results: list[dict[str, Any]] = []
    syncs: list[float] = []

    async def client_loop(i: int) -> None:
        n = i
        await asyncio.sleep(i * args.stagger)  # spread the requests' starts, as independent clients would be
        while time.perf_counter() < stop_at:
            results.append(await stream(client, PROMPTS[n % len(PROMPTS)], args.max_tokens))
            if results[-1]["error"]:
                await asyncio.sleep(args.retry)
            n += 1

    async def syncer() -> None:
        while True:
            await asyncio.sleep(args.every)
            if time.perf_counter() >= stop_at:
                return
            nxt = 1 - state["version"]
            t0 = time.perf_counter()
            if kind == "in place":
                await post(client, "/v1/load_lora_adapter", {**_load(versions[nxt]), "load_inplace": True})
            else:
                await post(client, "/v1/unload_lora_adapter", {"lora_name": "pol"})
                await post(client, "/v1/load_lora_adapter", _load(versions[nxt]))
            syncs.append(time.perf_counter() - t0)
            state["version"] = nxt

    t0 = time.perf_counter()
    jobs = [client_loop(i) for i in range(args.clients)]
    await asyncio.gather(*jobs, *([syncer()] if kind != "steady" else []))
    return {"kind": kind, "wall": time.perf_counter() - t0, "results": results, "syncs": syncs}


def _load(folder: str) -> dict[str, Any]:
    return {"lora_name": "pol", "lora_path": folder}


def summarize(kind: str, runs: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    results = [r for run in runs if run["kind"] == kind for r in run["results"]]
    wall = sum(run["wall"] for run in runs if run["kind"] == kind)
    syncs = sorted(s for run in runs if run["kind"] == kind for s in run["syncs"])
    ok = [r for r in results if not r["error"]]
    gaps = sorted(b - a for r in ok for a, b in zip(r["times"], r["times"][1:], strict=False))
    errors = Counter(r["error"].split(":")[0] for r in results if r["error"])
    return {
        "kind": kind,
        "requests": len(results),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "first_error": next((r["error"] for r in results if r["error"]), None),
        "tokens_per_s": len(ok) * tokens / wall,
        "gap_p50": _q(gaps, 0.5),
        "gap_p99": _q(gaps, 0.99),
        "gap_max": gaps[-1] if gaps else float("nan"),
        "syncs": len(syncs),
        "sync_median": statistics.median(syncs) if syncs else float("nan"),
        "sync_max": syncs[-1] if syncs else float("nan"),
    }


def _q(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(int(q * len(values)), len(values) - 1)]


async def run(url: str, versions: list[str], args: argparse.Namespace) -> list[dict]:
    headers = {"Authorization": f"Bearer {KEY}"}
    limits = httpx.Limits(max_connections=args.clients + 2)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:
        warm = await stream(client, PROMPTS[0], args.max_tokens)  # v0 is loaded at start-up
        if warm["error"]:
            raise SystemExit(f"the warm-up request failed: {warm['error']}")
        state = {"version": 0}
        runs = []
        for _ in range(args.rounds):
            for kind in PHASES:
                runs.append(await phase(client, kind, versions, args, state))
    return runs


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| phase | requests | errors | tokens/s | token gap p50 / p99 / max, ms | syncs | sync median / max, s |",
        "|---|---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        sync = "" if not r["syncs"] else f"{r['sync_median']:.3f} / {r['sync_max']:.3f}"
        out.append(
            f"| {r['kind']} | {r['requests']} | {r['errors']} | {r['tokens_per_s']:.1f} | {r['gap_p50'] * 1e3:.0f} / {r['gap_p99'] * 1e3:.0f} / "
            f"{r['gap_max'] * 1e3:.0f} | {r['syncs']} | {sync} |"
        )
    return "\n".join(out)


def report(args: argparse.Namespace, rows: list[dict[str, Any]], load_avg: tuple[float, float]) -> str:
    import torch

    command = "benchmarks/bench_inplace.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    by = {r["kind"]: r for r in rows}
    steady, inplace, reload = by["steady"], by["in place"], by["unload + load"]
    kinds = ", ".join(f"{k}: {v}" for k, v in reload["error_kinds"].items())
    lines = [
        "## Updating a served adapter while it serves: `load_inplace` against unload + load",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {os.cpu_count()} CPUs ({torch.backends.cpu.get_cpu_capability()}), Python "
        f"{platform.python_version()}, torch {torch.__version__}; 1-minute load average before / after: "
        f"{load_avg[0]:.2f} / {load_avg[1]:.2f} (the run's own processes count in the second)",
        f"- command: `.venv/bin/python {command.strip()}`",
        f"- setup: adapter `pol`, r={args.rank} on every linear layer of "
        f"{args.model or 'SmolLM2-135M-Instruct'} (float32 on this CPU), two versions of its file; {args.clients} "
        f"clients stream completions from it without pause (greedy, {args.max_tokens} tokens each; their first "
        f"requests {args.stagger:g} s apart, {args.retry:g} s of pause after an error); a sync every "
        f"{args.every:g} s; {args.rounds} rounds of the three phases, {args.seconds:g} s each, interleaved; server "
        f"--max-batch {args.max_batch}",
        "",
        table(rows),
        "",
        f"- In place: {inplace['errors']} errors; tokens/s {inplace['tokens_per_s'] / steady['tokens_per_s']:.2f}x steady's; a sync takes "
        f"{inplace['sync_median']:.3f} s (median).",
        f"- Unload + load: {reload['errors']} errors ({kinds or 'none'}), "
        f"requests that arrived while the name was gone; a sync takes {reload['sync_median']:.3f} s (median).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--every", type=float, default=2.0, help="seconds between syncs (default: 2)")
    p.add_argument("--seconds", type=float, default=15.0, help="length of each phase (default: 15)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--stagger", type=float, default=0.4, help="seconds between the clients' first requests")
    p.add_argument("--retry", type=float, default=0.1, help="seconds a client waits after an error")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch (default: 8)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the server (default: torch's default)")
    p.add_argument("--model", help="HF folder or .gguf file (default: lorakit's default model)")
    p.add_argument("--write-docs", action="store_true", help=f"update the section of {DOCS}")
    args = p.parse_args(argv)
    load_avg = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "adapters"
        paths = make_versions(args.model, args.rank, root)
        proc, url = start_server(
            args, [("pol", paths[0])], Path(tmp) / "server.log", ["--adapter-root", str(root)]
        )
        try:
            runs = asyncio.run(run(url, [p.name for p in paths], args))
        finally:
            stop_server(proc)
    rows = [summarize(kind, runs, args.max_tokens) for kind in PHASES]
    for r in rows:
        if r["first_error"]:
            print(f"first error ({r['kind']}): {r['first_error']}", file=sys.stderr)
    section = report(args, rows, (load_avg, os.getloadavg()[0]))
    print(section)
    if args.write_docs:
        from lorakit.bench import write_docs

        write_docs(DOCS, section, START, END)
        print(f"\nwrote the bench_inplace section of {DOCS}")
    by = {r["kind"]: r for r in rows}
    return 1 if by["in place"]["errors"] or by["steady"]["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
