"""Ladder LoRA vs LoRA: peak memory and time of a training step, and accuracy after the same wall-clock budget.

Step (default mode). Variants, each in its own subprocess, in interleaved rounds (order rotated, see
`lorakit.bench.round_order`), all on the default model (SmolLM2-135M-Instruct, fp32, CPU), a batch of random ids
(`--batch` x `--seq`, default 4 x 256, labels = ids; `--labelled N`: only the last N positions of each
row learned, as with prompt/completion data, which makes the LM-head loss, a cost both variants pay, smaller), lorakit's training path (`causal_lm_loss`: fused LoRA
kernels and the chunked LM-head loss), AdamW:

* ``lora``: `lorakit.inject`, r=16, alpha=16, all seven projections (q/k/v/o/gate/up/down);
* ``ladder``: `lorakit.attach_ladder` with the default `LadderConfig` (reduction 8, rank 16, a ladder from every
  block, MLP side blocks);
* ``ladder-transformer``: the same with causal attention side blocks.

Each worker loads the model, builds its variant, resets the kernel's RSS high-water mark (`VmHWM`, via
``/proc/self/clear_refs``), runs one untimed warm-up step and ``--steps`` timed ones. Reported per variant: the
median step time, the peak RSS of the whole process (`ru_maxrss`: model load included) and of the step phase alone
(`VmHWM` after the reset), and the RSS right after loading; ratios ladder / lora paired per round, median
[min-max].

Quality (``--quality SECONDS``): each of ``lora`` and ``ladder`` trains on the built-in ``dates`` task (batch 8,
the `lorakit train` defaults otherwise, constant learning rate after 4 warm-up steps) for the same wall-clock
budget (the ladder at each `--ladder-lr`; LoRA at the default 2e-3), then reports greedy exact-match accuracy on ``--n-eval`` held-out examples.

    .venv/bin/python benchmarks/bench_ladder.py [--rounds 3] [--steps 3] [--write-docs]
    .venv/bin/python benchmarks/bench_ladder.py --quality 300 [--ladder-lr 5e-3] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from lorakit.bench import (
    hwm_gb,
    peak_rss_gb,
    reset_peak_rss,
    round_order,
    rss_now_gb,
    spawn_worker,
    write_docs,
)

VARIANTS = ["lora", "ladder", "ladder-transformer"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DOCS = Path(__file__).resolve().parent.parent / "docs" / "ladder.md"


def build(model, variant: str) -> None:
    import lorakit

    if variant == "lora":
        lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=16, targets=TARGETS))
    else:
        block = "transformer" if variant == "ladder-transformer" else "mlp"
        lorakit.attach_ladder(model, lorakit.LadderConfig(block=block))


def step_worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import lorakit
    from lorakit.head import causal_lm_loss

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, _ = lorakit.load_model()
    build(model, args.worker)
    model.train()
    ids = torch.randint(
        0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)
    )
    labels = ids.clone()
    if (
        args.labelled
    ):  # only the last `labelled` positions of each row are learned, as in prompt/completion data
        labels[:, : -args.labelled] = -100
    batch = {"input_ids": ids, "labels": labels}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    load_rss, load_peak = rss_now_gb(), peak_rss_gb()
    can_reset = reset_peak_rss()

    def step() -> float:
        loss = causal_lm_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {
        "variant": args.worker,
        "step_s": statistics.median(times),
        "peak_rss_gb": max(load_peak, peak_rss_gb()),
        "step_peak_gb": hwm_gb() if can_reset else None,
        "load_rss_gb": load_rss,
        "trainable": sum(p.numel() for p in params),
    }


def quality_worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import lorakit
    from lorakit.data.tokenize import encode_dataset
    from lorakit.head import causal_lm_loss
    from lorakit.train.config import RunConfig
    from lorakit.train.evaluate import exact_match
    from lorakit.train.run import load_examples
    from lorakit.train.schedule import batch_order, collate

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = RunConfig()
    cfg.data.n_eval = args.n_eval
    model, tok = lorakit.load_model()
    train_ex, eval_ex, _ = load_examples(cfg)
    rows, _ = encode_dataset(tok, train_ex, max_len=cfg.data.max_len)
    if args.worker == "lora":
        lorakit.inject(model, cfg.lora)  # the `lorakit train` default: r=16, alpha=32, all-linear
    else:
        lorakit.attach_ladder(
            model, lorakit.LadderConfig(block="transformer" if "transformer" in args.worker else "mlp")
        )
    lr = float(args.worker.partition("@")[2] or cfg.train.lr)  # "ladder@0.002": at that learning rate
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (cfg.train.warmup_steps + 1)))
    model.train()
    t0, steps, losses = time.perf_counter(), 0, []
    while time.perf_counter() - t0 < args.quality:
        batch = collate([rows[i] for i in batch_order(len(rows), steps, 0, cfg)], tok.pad_token_id)
        loss = causal_lm_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        steps += 1
    train_s = time.perf_counter() - t0
    acc, _ = exact_match(
        model, tok, eval_ex, max_new_tokens=cfg.eval.max_new_tokens, merge=args.worker == "lora"
    )
    return {
        "variant": args.worker,
        "steps": steps,
        "train_s": train_s,
        "lr": lr,
        "accuracy": acc,
        "last_loss": statistics.mean(losses[-5:]),
    }


def saved_bytes(args: argparse.Namespace) -> str:
    """Bytes autograd saves for backward during one training forward, LoRA vs ladder (one process; no timing)."""
    import torch

    import lorakit
    from lorakit.head import causal_lm_loss

    torch.set_num_threads(args.threads)
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    lines = ["| variant | tensors saved | bytes saved, MB |", "|---|---:|---:|"]
    for variant in VARIANTS:
        model, _ = lorakit.load_model()
        build(model, variant)
        model.train()
        seen: dict[int, torch.Tensor] = {}

        def pack(t: torch.Tensor, seen=seen) -> torch.Tensor:
            seen.setdefault(id(t), t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = causal_lm_loss(model, {"input_ids": ids, "labels": ids})
        loss.backward()
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in seen.values()}
        lines.append(f"| {variant} | {len(seen)} | {sum(storages.values()) / 1e6:.1f} |")
    return (
        f"Command: `python benchmarks/bench_ladder.py --saved --batch {args.batch} --seq {args.seq}` (default model, "
        "fp32, every position labelled; distinct storages counted once).\n\n" + "\n".join(lines)
    )


def spawn(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", variant, "--threads", str(args.threads)]
    cmd += ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
    cmd += ["--labelled", str(args.labelled)]
    cmd += ["--quality", str(args.quality), "--n-eval", str(args.n_eval)]
    return spawn_worker(cmd, repr(variant))


def _mmm(xs: list[float], fmt: str = ".2f") -> str:
    return f"{statistics.median(xs):{fmt}} [{min(xs):{fmt}}–{max(xs):{fmt}}]"


def step_table(rounds: list[dict[str, dict[str, Any]]], variants: list[str]) -> str:
    lines = [
        "| variant | step, s | peak RSS (process), GB | peak RSS (step phase), GB | RSS after load, GB | trainable |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for v in variants:
        col = {k: [r[v][k] for r in rounds] for k in ("step_s", "peak_rss_gb", "step_peak_gb", "load_rss_gb")}
        lines.append(
            f"| {v} | {_mmm(col['step_s'])} | {_mmm(col['peak_rss_gb'], '.3f')} | "
            f"{_mmm(col['step_peak_gb'], '.3f')} | {_mmm(col['load_rss_gb'], '.3f')} | {rounds[0][v]['trainable']:,} |"
        )
    for v in variants[1:]:
        ratio = {
            k: [r[v][k] / r["lora"][k] for r in rounds] for k in ("step_s", "peak_rss_gb", "step_peak_gb")
        }
        lines.append(
            f"| **{v} / lora** | {_mmm(ratio['step_s'], '.3f')}× | {_mmm(ratio['peak_rss_gb'], '.3f')}× | "
            f"{_mmm(ratio['step_peak_gb'], '.3f')}× | | |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per worker after 1 warm-up (default: 3)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument(
        "--labelled", type=int, default=0, help="learn only the last N positions of each row (default: all)"
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per worker")
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS, help="lora always runs")
    p.add_argument(
        "--quality", type=float, default=0.0, help="instead: train each for this many seconds, then eval"
    )
    p.add_argument("--n-eval", type=int, default=100, help="quality: held-out examples for accuracy")
    p.add_argument(
        "--ladder-lr", type=float, nargs="+", default=[2e-3], help="quality: learning rate(s) of the ladder"
    )
    p.add_argument("--saved", action="store_true", help="instead: bytes saved for backward, LoRA vs ladder")
    p.add_argument("--write-docs", action="store_true", help="update docs/ladder.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        result = quality_worker(args) if args.quality else step_worker(args)
        print(json.dumps(result))
        return
    if args.saved:
        section = saved_bytes(args)
        print(section)
        if args.write_docs:
            write_docs(DOCS, section, "<!-- saved_bytes:start -->", "<!-- saved_bytes:end -->")
        return
    variants = ["lora", *[v for v in args.variants if v != "lora"]]
    if args.quality:
        variants = ["lora", *(f"ladder@{lr:g}" for lr in args.ladder_lr)]
    rounds = []
    for i in range(args.rounds):
        res = {}
        for v in round_order(variants, i):
            res[v] = spawn(args, v)
            print(f"round {i + 1}: {json.dumps(res[v])}", file=sys.stderr, flush=True)
        rounds.append(res)
    cmd = "python benchmarks/bench_ladder.py " + " ".join(a for a in sys.argv[1:] if a != "--write-docs")
    if args.quality:
        lines = [
            "| variant | lr | steps in budget | train loss (last 5) | accuracy |",
            "|---|---:|---:|---:|---:|",
        ]
        for v in variants:
            rs = [r[v] for r in rounds]
            acc = [100 * r["accuracy"] for r in rs]
            lines.append(
                f"| {v} | {rs[0]['lr']:g} | {_mmm([r['steps'] for r in rs], '.0f')} | "
                f"{_mmm([r['last_loss'] for r in rs], '.3f')} | {_mmm(acc, '.1f')} % |"
            )
        table = "\n".join(lines)
        marker = "quality"
        section = (
            f"Command: `{cmd}` ({os.cpu_count()} CPUs, shared with other work: numbers are noisy). Budget "
            f"{args.quality:g} s of training each, batch 8, then greedy exact match on {args.n_eval} held-out "
            f"examples; {args.rounds} round(s), median [min–max].\n\n{table}"
        )
    else:
        table = step_table(rounds, variants)
        marker = "step_labelled" if args.labelled else "step"
        section = (
            f"Command: `{cmd}` ({os.cpu_count()} CPUs, shared with other work: numbers are noisy). Batch "
            f"{args.batch}x{args.seq}, "
            + (
                f"labels on the last {args.labelled} positions of each row"
                if args.labelled
                else "every position labelled"
            )
            + f", fp32, {args.steps} timed steps per worker after a warm-up step, "
            f"{args.rounds} interleaved round(s), median [min–max]; ratios paired per round.\n\n{table}"
        )
    print(table)
    if args.write_docs:
        write_docs(
            DOCS, section, f"<!-- bench_ladder_{marker}:start -->", f"<!-- bench_ladder_{marker}:end -->"
        )


if __name__ == "__main__":
    main()
