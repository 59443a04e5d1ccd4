"""Scoring prompts (`echo` with `logprobs`, what lm-evaluation-harness's loglikelihood requests ask) in the serve
engine: memory and time of the two paths.

- `hidden`: with a plain LM head, the prompt's log-probabilities come from the last hidden states, SCORE_CHUNK
  positions at a time (what the engine does for the default model);
- `logits`: the logits of every position of the whole prefill batch at once (the engine's path for a head that is
  not plain: adapted, softcapped; and its only path before session 19).

Each path runs in its own process (so peak RSS is its own), in alternating order: the default model in float32,
the serve engine in this process, `--rows` scored requests of `--tokens`-token prompts (distinct) queued before the
engine starts, so they share one prefill. Reported: the rise of peak RSS (ru_maxrss) over the process's RSS after
loading, and the wall time from start to the last score.

    .venv/bin/python benchmarks/bench_scoring.py                       # 8 rows of 1,000 tokens, 2 rounds
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import statistics
import subprocess
import sys
import time


def worker(path: str, rows: int, tokens: int) -> dict:
    import torch

    import lorakit
    from lorakit.bank import AdapterBank
    from lorakit.serve.engine import Engine, EngineConfig
    from lorakit.serve.requests import Done, Failed, GenRequest, SamplingParams

    torch.set_num_threads(os.cpu_count() or 1)
    model, tok = lorakit.load_model(None)
    text = " ".join(["The cat sat on the mat, and then it slept until noon."] * (tokens // 8))
    base_ids = tok(text)["input_ids"][: tokens - 1]
    eng = Engine(
        model, tok, AdapterBank(model), EngineConfig(max_batch=rows, wait_ms=0, max_prefill_tokens=10**9)
    )
    if path == "logits":
        eng._head = None  # the engine's path for a head that is not plain
    elif eng._head is None:
        raise SystemExit("the default model's head should be plain")
    queues = []
    for i in range(rows):
        q: queue.Queue = queue.Queue()
        ids = [tok(str(i))["input_ids"][0], *base_ids]  # distinct prompts: no shared prefill
        eng.submit(GenRequest(ids, None, SamplingParams(max_tokens=0, prompt_logprobs=1), q.put))
        queues.append(q)
    rss_loaded = _rss_now()
    t0 = time.perf_counter()
    eng.start()
    for q in queues:
        while not isinstance(ev := q.get(timeout=1800), (Done, Failed)):
            pass
        if isinstance(ev, Failed):
            raise SystemExit(f"scoring failed: {ev.message}")
    wall = time.perf_counter() - t0
    eng.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"path": path, "wall_s": wall, "rss_after_load_gb": rss_loaded, "peak_gb": peak}


def _rss_now() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8, help="scored requests in one prefill (default: 8)")
    p.add_argument("--tokens", type=int, default=1000, help="tokens per prompt (default: 1000)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--worker", choices=["hidden", "logits"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.rows, args.tokens)))
        return 0
    import torch

    results: dict[str, list[dict]] = {"hidden": [], "logits": []}
    for r in range(args.rounds):
        for path in ("hidden", "logits") if r % 2 == 0 else ("logits", "hidden"):
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                path,
                "--rows",
                str(args.rows),
                "--tokens",
                str(args.tokens),
            ]
            out = (
                subprocess.run(cmd, capture_output=True, text=True, check=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            results[path].append(json.loads(out))
    print(
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs; {args.rows} prompts of "
        f"{args.tokens} tokens scored in one prefill, float32; {args.rounds} rounds, alternating"
    )
    print("| path | peak RSS - RSS after load, GB (each round) | wall time, s (each round) |")
    print("|---|---|---|")
    rise = {}
    for path, runs in results.items():
        rises = [x["peak_gb"] - x["rss_after_load_gb"] for x in runs]
        walls = [x["wall_s"] for x in runs]
        rise[path] = statistics.median(rises)
        each_rise, each_wall = (", ".join(f"{v:.2f}" for v in vs) for vs in (rises, walls))
        print(f"| {path} | {rise[path]:.2f} ({each_rise}) | {statistics.median(walls):.2f} ({each_wall}) |")
    print(f"\nhidden / logits: {rise['hidden'] / rise['logits']:.2f}x the memory rise")
    return 0


if __name__ == "__main__":
    sys.exit(main())
