"""Throughput and peak memory of `lorakit train`'s loop with lorakit LoRA vs PEFT LoRA, same loop, same settings.

Each variant runs in its own subprocess (so peak RSS is its own), in interleaved rounds with the order rotated:
it loads the default model, builds the built-in task's training rows exactly as `lorakit train` does, injects
LoRA (lorakit, or `peft.get_peft_model` with the same r/alpha/targets), and runs `train_loop` for `--steps`
steps of the default batch. Reported: training tokens/s (after one warm-up step) and peak RSS of the process.

    .venv/bin/python benchmarks/bench_train.py [--rounds 2] [--steps 8] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from bench_step import peak_rss_gb, round_order, write_docs  # noqa: E402

VARIANTS = ["lorakit", "peft"]


def run_worker(variant: str, steps: int) -> dict[str, Any]:
    import torch

    import lorakit
    from lorakit.data.tokenize import encode_dataset
    from lorakit.train.config import RunConfig
    from lorakit.train.loop import train_loop
    from lorakit.train.run import load_examples

    torch.manual_seed(0)
    cfg = RunConfig()
    cfg.train.steps, cfg.train.save_every, cfg.train.warmup_steps = steps + 1, 0, 1
    model, tok = lorakit.load_model()
    train_ex, _, _ = load_examples(cfg)
    rows, _ = encode_dataset(tok, train_ex, max_len=cfg.data.max_len)
    if variant == "lorakit":
        lorakit.inject(model, cfg.lora)
    else:
        import peft

        pcfg = peft.LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        model = peft.get_peft_model(model, pcfg)
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as out:
        train_loop(model, rows, cfg, pad_id=tok.pad_token_id, out_dir=Path(out), callbacks=[records.append])
    steps_rec = [r for r in records if "loss" in r]
    first, last = steps_rec[0], steps_rec[-1]  # throughput after the warm-up step
    tokens = last["tokens_per_s"] * last["elapsed_s"] - first["tokens_per_s"] * first["elapsed_s"]
    return {
        "variant": variant,
        "tokens_per_s": tokens / (last["elapsed_s"] - first["elapsed_s"]),
        "peak_rss_gb": peak_rss_gb(),
        "final_loss": last["loss"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="timed steps per worker (after 1 warm-up step)")
    p.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.steps)))
        return
    rounds = []
    for i in range(args.rounds):
        res = {}
        for v in round_order(VARIANTS, i):
            out = subprocess.run(
                [sys.executable, __file__, "--worker", v, "--steps", str(args.steps)],
                capture_output=True,
                text=True,
                check=True,
            )
            res[v] = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"round {i + 1}: {v}: {res[v]['tokens_per_s']:.1f} tokens/s, {res[v]['peak_rss_gb']:.2f} GB",
                file=sys.stderr,
            )
        rounds.append(res)
    tps = {v: [r[v]["tokens_per_s"] for r in rounds] for v in VARIANTS}
    rss = {v: [r[v]["peak_rss_gb"] for r in rounds] for v in VARIANTS}
    t_ratio = [r["lorakit"]["tokens_per_s"] / r["peft"]["tokens_per_s"] for r in rounds]
    m_ratio = [r["lorakit"]["peak_rss_gb"] / r["peft"]["peak_rss_gb"] for r in rounds]
    table = "\n".join(
        [
            "| loop driving | tokens/s | peak RSS, GB |",
            "|---|---:|---:|",
            *(
                f"| {v} | {statistics.median(tps[v]):.1f} [{min(tps[v]):.1f}–{max(tps[v]):.1f}] | "
                f"{statistics.median(rss[v]):.3f} [{min(rss[v]):.3f}–{max(rss[v]):.3f}] |"
                for v in VARIANTS
            ),
            f"| **lorakit / peft** | {statistics.median(t_ratio):.3f}× [{min(t_ratio):.3f}–{max(t_ratio):.3f}] | "
            f"{statistics.median(m_ratio):.3f}× [{min(m_ratio):.3f}–{max(m_ratio):.3f}] |",
        ]
    )
    print(table)
    if args.write_docs:
        section = (
            "## `lorakit train` loop: lorakit LoRA vs PEFT LoRA\n\n"
            f"- command: `.venv/bin/python benchmarks/bench_train.py --rounds {args.rounds} --steps {args.steps} "
            f"--write-docs`\n- setup: default `lorakit train` settings (SmolLM2-135M-Instruct, built-in `dates` "
            f"task, batch 8, r=16, alpha=32, all-linear, fp32, {os.cpu_count()} CPUs), the same `train_loop` for "
            f"both; tokens/s over {args.steps} steps after one warm-up step; peak RSS of each worker process; "
            f"{args.rounds} interleaved rounds, median [min–max]. Higher tokens/s is better.\n\n"
            f"{table}"
        )
        docs = Path(__file__).parent.parent / "docs" / "benchmarks.md"
        write_docs(docs, section, "<!-- bench_train:start -->", "<!-- bench_train:end -->")


if __name__ == "__main__":
    main()
