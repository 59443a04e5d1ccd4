"""Benchmark: one LoRA training step, lorakit vs PEFT vs the frozen-base lower bound (`lorakit bench`).

A step is forward, backward, ``AdamW.step()`` and ``zero_grad()`` on a causal-LM loss (labels = the random input
ids, fixed seed), fp32, on the CPU. Variants (each one entry of ``lorakit.bench_worker.VARIANT_BUILDERS``):

* ``lorakit``: ``lorakit.inject`` with r, alpha=r, the given dropout, on all seven projections
  (q/k/v/o/gate/up/down), trained the way ``lorakit train`` does: fused LoRA kernels and the chunked LM-head loss;
* ``lorakit-grouped``: as ``lorakit`` plus one shared x·Aᵀ for q/k/v and gate/up (``LORAKIT_GROUPS=1``);
* ``lorakit-plain``: the same adapter on plain autograd and the model's own loss (``train.fused: false``);
* ``lorakit-lib``: the library path: ``lorakit.inject`` and then the model's own ``forward(input_ids, labels=…)``
  in a plain loop, as a PEFT user would switch (the lean loss and block rewrites `inject` installs);
* ``lorakit-lib-noblocks``: as ``lorakit-lib`` without the block rewrites (lorakit.blocks);
* ``peft``: ``peft.get_peft_model`` with the same config, the model's own loss;
* ``bound``: the same model with every weight frozen, fed detached ``inputs_embeds`` that require grad, so the
  backward pass reaches the inputs through every layer but computes no weight gradient. There is no optimizer.
  No LoRA implementation with the model's own loss can beat this: it is the cost of the frozen base alone;
* ``bound-ours``: the bound with lorakit's chunked LM-head loss, which lowers the bound itself (the N×V logits
  are never held at once).

Method. Peak RSS (``ru_maxrss``) only ever grows, so each measurement runs in its own subprocess
(``--worker VARIANT``), which loads the model, sets the thread count, runs one untimed warm-up step, times
``--steps`` steps with ``time.perf_counter()`` and prints one JSON line. It also reports its RSS after load and
its peak RSS during the steps alone (``VmHWM`` reset after load). The parent runs ``--rounds`` rounds of all
variants, rotating the order each round (and reversing it every other cycle of rotations, so a variant does not
always follow the same one) so that drift of the machine hits every variant alike. It reports the median over
rounds of each worker's median step time, the peak RSS, and the paired ratios as median [min–max] of the
per-round ratios.

Noise. On the 2-core VM a step allocates ~0.85 GB of fresh pages (glibc hands large freed blocks back to the
kernel), and first-touch page faults there cost 1–2 s per GB, depending on what ran before; worker-to-worker
spread is about ±7 %. Three rounds cannot resolve differences under ~5 %: use ``--rounds 6`` or more before
drawing conclusions from small ratios.

Usage::

    lorakit bench                                  # defaults: 3 rounds x 3 steps, batch 4 x 256, default model
    lorakit bench --model path/to/hf-folder --r 64 --dropout 0.05
    lorakit bench --quick                          # smoke check, < 1 minute
    .venv/bin/python benchmarks/bench_step.py --write-docs    # the same, also updating docs/benchmarks.md

The defaults take several minutes on 2 CPU cores (about 10 s a step). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from lorakit.bench_worker import (  # noqa: F401 - the worker's helpers, also for benchmarks/*.py
    LABELS,
    TARGETS,
    VARIANT_BUILDERS,
    hwm_gb,
    peak_rss_gb,
    reset_peak_rss,
    rss_now_gb,
    run_worker,
)

VARIANTS = tuple(VARIANT_BUILDERS)
QLORA_VARIANTS = ["lorakit", "lorakit-nf4", "peft", "peft-bnb"]
DEFAULT_VARIANTS = ["lorakit", "peft", "bound", "bound-ours"]
RATIOS = [
    ("lorakit", "peft"),
    ("lorakit-lib", "peft"),
    ("lorakit-lib", "lorakit-lib-noblocks"),
    ("lorakit", "bound"),
    ("lorakit", "bound-ours"),
    ("lorakit-plain", "bound"),
    ("lorakit", "lorakit-plain"),
    ("lorakit-grouped", "lorakit"),
    ("lorakit-nf4", "lorakit"),
    ("peft-bnb", "lorakit"),
    ("lorakit-nf4", "peft-bnb"),
]
DOCS = Path("docs") / "benchmarks.md"
START, END = "<!-- bench_step:start -->", "<!-- bench_step:end -->"
QUICK = {"batch": 1, "seq": 32, "rounds": 1, "steps": 2}


# --------------------------------------------------------------------------------------------------------------
# Parent: interleaved rounds, summary, docs
# --------------------------------------------------------------------------------------------------------------


def worker_command(args: argparse.Namespace, variant: str) -> list[str]:
    cmd = [sys.executable, "-m", "lorakit.bench", "--worker", variant]
    cmd += ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
    cmd += ["--r", str(args.r), "--dropout", str(args.dropout), "--threads", str(args.threads)]
    cmd += ["--device", args.device, "--dtype", args.dtype] + (
        ["--grad-checkpointing"] if args.grad_checkpointing else []
    )
    if args.model:
        cmd += ["--model", args.model]
    return cmd


def spawn(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    return spawn_worker(worker_command(args, variant), repr(variant))


def spawn_worker(cmd: list[str], label: str) -> dict[str, Any]:
    """Run a benchmark's worker process (`cmd`), which imports this same lorakit, and return the JSON object of its
    last line that starts with "{"; SystemExit naming `label`, with the end of its stderr, if it fails."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    src = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = src + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else src
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"worker {label} failed (exit code {proc.returncode}, {len(lines)} JSON lines)")
    return json.loads(lines[-1])


def round_order(variants: list[str], i: int) -> list[str]:
    """Round ``i``'s order: rotated by ``i``, so each variant takes each position once every ``n`` rounds.

    Rotation alone keeps the cyclic order, so a variant would always follow the same one; every other cycle of
    ``n`` rounds is therefore reversed (rounds n..2n-1 of 3 variants: BPL, LBP, PLB), which mixes predecessors.
    """
    n = len(variants)
    order = variants[i % n :] + variants[: i % n]
    return order[::-1] if (i // n) % 2 else order


def run_rounds(args: argparse.Namespace) -> list[dict[str, dict[str, Any]]]:
    """``args.rounds`` rounds of every variant in ``round_order``."""
    rounds = []
    for i in range(args.rounds):
        order = round_order(list(args.variants), i)
        results = {}
        for variant in order:
            res = spawn(args, variant)
            results[variant] = res
            print(
                f"round {i + 1}/{args.rounds} {variant:8s} step {res['step_s']:.3f} s "
                f"(steps {', '.join(f'{t:.3f}' for t in res['steps_s'])}), peak {_peak_name(res)} "
                f"{_peak(res):.3f} GB, "
                f"loss {res['first_loss']:.4f}",
                file=sys.stderr,
                flush=True,
            )
        rounds.append(results)
    return rounds


def spread(values: list[float], fmt: str, unit: str = "") -> str:
    """``median [min–max]``, or just the median when there is one value."""
    med = format(statistics.median(values), fmt) + unit
    if len(values) == 1:
        return med
    return f"{med} [{format(min(values), fmt)}–{format(max(values), fmt)}]"


def _peak(res: dict[str, Any]) -> float:
    """The memory figure that counts where the worker ran: peak GPU memory on a GPU, peak RSS on the CPU."""
    return res["peak_gpu_gb"] if res.get("peak_gpu_gb") is not None else res["peak_rss_gb"]


def _peak_name(res: dict[str, Any]) -> str:
    return "GPU memory" if res.get("peak_gpu_gb") is not None else "RSS"


def summarize(rounds: list[dict[str, dict[str, Any]]], variants: list[str]) -> tuple[str, dict[str, Any]]:
    """The markdown tables and the key numbers (medians of the per-round paired ratios). Memory is the peak GPU
    memory (`torch.cuda.max_memory_allocated` during the steps) where the workers ran on a GPU, else peak RSS."""
    gpu = all(r[v].get("peak_gpu_gb") is not None for r in rounds for v in variants)
    has_train_peak = not gpu and all(r[v]["train_peak_gb"] is not None for r in rounds for v in variants)
    mem, what = ("peak_gpu_gb", "peak GPU memory") if gpu else ("peak_rss_gb", "peak RSS")
    after_load = ("load_gpu_gb", "GPU memory after load") if gpu else ("load_rss_gb", "RSS after load")
    lines = [
        f"| variant | trainable params | step time, s | {what}, GB | {after_load[1]}, GB"
        + (" | peak RSS during steps, GB |" if has_train_peak else " |"),
        "|---|---:|---:|---:|---:|" + ("---:|" if has_train_peak else ""),
    ]
    for v in variants:
        runs = [r[v] for r in rounds]
        row = (
            f"| {v} | {runs[0]['trainable']:,} | {spread([x['step_s'] for x in runs], '.3f' if gpu else '.2f')} "
            f"| {spread([x[mem] for x in runs], '.3f')} "
            f"| {spread([x[after_load[0]] for x in runs], '.3f')} |"
        )
        if has_train_peak:
            row += f" {spread([x['train_peak_gb'] for x in runs], '.3f')} |"
        lines.append(row)

    ratios: dict[str, Any] = {"memory": what}  # what the "mem" ratios measure
    pairs = [(a, b) for a, b in RATIOS if a in variants and b in variants]
    if pairs:
        lines += ["", f"| ratio | step time | {what} |", "|---|---:|---:|"]
    for a, b in pairs:
        t = [r[a]["step_s"] / r[b]["step_s"] for r in rounds]
        m = [r[a][mem] / r[b][mem] for r in rounds]
        ratios[f"{a}/{b}"] = {"time": t, "mem": m}
        lines.append(f"| {a} / {b} | {spread(t, '.3f', '×')} | {spread(m, '.3f', '×')} |")

    losses = {v: rounds[0][v]["first_loss"] for v in variants}
    if len({round(x, 4) for x in losses.values()}) > 1:
        lines.append(f"\nWarning: the variants' first-step losses differ: {losses}")
    return "\n".join(lines), ratios


def verdict(values: list[float], what: str, less: str, more: str) -> str:
    """A ``"0.926× the time of a PEFT step (faster in every round)"``-style phrase for paired ratios."""
    med = statistics.median(values)
    if all(v < 1 for v in values):
        tail = f"{less} in every round" if len(values) > 1 else less
    elif all(v > 1 for v in values):
        tail = f"{more} in every round" if len(values) > 1 else more
    else:
        tail = "the rounds disagree"
    return f"{med:.3f}× {what} ({tail})"


def interpretation(ratios: dict[str, Any]) -> str:
    """Sentences on the lorakit/peft and lorakit/bound ratios."""
    lp, lb, lo = ratios.get("lorakit/peft"), ratios.get("lorakit/bound"), ratios.get("lorakit/bound-ours")
    mem = ratios.get("memory", "peak RSS")
    parts = []
    if lp:
        parts.append(
            f"A lorakit step takes {verdict(lp['time'], 'the time of a PEFT step', 'faster', 'slower')} and "
            f"{verdict(lp['mem'], f'its {mem}', 'smaller', 'larger')}."
        )
    if lb:
        parts.append(
            f"Against the frozen-base lower bound (the model's own loss), lorakit LoRA training costs "
            f"{statistics.median(lb['time']):.3f}× the time and {statistics.median(lb['mem']):.3f}× the peak memory"
            + (
                f"; against the bound with lorakit's chunked loss, {statistics.median(lo['time']):.3f}× and "
                f"{statistics.median(lo['mem']):.3f}×."
                if lo
                else "."
            )
        )
    nl, bl, nb = (
        ratios.get("lorakit-nf4/lorakit"),
        ratios.get("peft-bnb/lorakit"),
        ratios.get("lorakit-nf4/peft-bnb"),
    )
    if nl:
        parts.append(
            f"QLoRA (lorakit NF4 base) takes {verdict(nl['time'], 'the time of LoRA', 'faster', 'slower')} "
            f"and {verdict(nl['mem'], f'its {mem}', 'smaller', 'larger')}."
        )
    if bl:
        parts.append(
            f"bitsandbytes + PEFT QLoRA takes {statistics.median(bl['time']):.3f}× the time of lorakit LoRA "
            f"and {statistics.median(bl['mem']):.3f}× its {mem}"
            + (
                f"; lorakit QLoRA / bitsandbytes QLoRA: {statistics.median(nb['time']):.3f}× time, "
                f"{statistics.median(nb['mem']):.3f}× {mem}."
                if nb
                else "."
            )
        )
    return " ".join(parts)


def display_command() -> str:
    exe = os.path.relpath(sys.executable)
    script = os.path.relpath(sys.argv[0])
    return shlex.join([exe if not exe.startswith("..") else "python", script, *sys.argv[1:]])


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def torch_capability() -> str:
    """torch's CPU kernel level (AVX2, AVX512, ...): the kind of CPU a figure comes from."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def gpu_name(device: str) -> str:
    """ ", GPU: NAME" when the run used a GPU, else ""."""
    import torch

    from lorakit.device import resolve_device

    d = resolve_device(device)
    return f", GPU: {torch.cuda.get_device_name(d)}" if d.type == "cuda" else ""


def cpu_name() -> str:
    from lorakit.device import cpu_model

    return cpu_model() or "unknown CPU"


def resolved_dtype(args: argparse.Namespace) -> str:
    """The base dtype the workers use: `--dtype`, with `auto` resolved as on this machine ("auto = bfloat16")."""
    from lorakit.device import dtype_name, placement

    chosen = dtype_name(placement(args.device, args.dtype)[1])
    return f"auto = {chosen}" if args.dtype == "auto" else chosen


def docs_section(args: argparse.Namespace, table: str, ratios: dict[str, Any], load_before: float) -> str:
    setup = (
        f"{args.rounds} rounds × {len(args.variants)} variants, {args.steps} timed steps per worker after 1 warm-up, "
        f"batch {args.batch} × {args.seq} tokens, r={args.r}, alpha={args.r}, dropout={args.dropout}, "
        f"device {args.device}, base dtype {resolved_dtype(args)} (adapters fp32; a 16-bit base under autocast, "
        "for lorakit and PEFT alike)"
        + (", gradient checkpointing" if args.grad_checkpointing else "")
        + f", {args.threads} threads, model: {args.model or 'lorakit default (SmolLM2-135M-Instruct)'}"
    )
    return "\n".join(
        [
            "## One LoRA training step: lorakit vs PEFT vs frozen-base bound"
            + (f" ({args.tag})" if args.tag else ""),
            "",
            f"- date: {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
            f"- machine: {os.cpu_count()} CPUs ({cpu_name()}, torch CPU capability "
            f"{torch_capability()}){gpu_name(args.device)}, Python {platform.python_version()}, "
            f"torch {version('torch')}, transformers {version('transformers')}, peft {version('peft')}",
            f"- command: `{display_command()}`",
            f"- 1-minute load average before the run: {load_before:.2f}",
            f"- setup: {setup}" + (" (**--quick** smoke run, not a measurement)" if args.quick else ""),
            "- step time: median over rounds of each worker's median step; peak RSS: `ru_maxrss` of the worker "
            "process (imports and load included); peak RSS during steps: `VmHWM` reset after load, so it covers "
            "warm-up and timed steps only; ratios: median [min–max] of the per-round paired ratios.",
            "",
            table,
            "",
            interpretation(ratios),
        ]
    ).rstrip()


def write_docs(path: Path, section: str, start: str = START, end: str = END) -> None:
    """Replace the text between the markers in ``path`` (appending them if missing), atomically."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{section}\n{end}"
    if start in text and end in text and text.index(start) < text.index(end):
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    from lorakit.cliargs import OneLineParser

    parser = OneLineParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all variants")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per worker (after 1 warm-up)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (alpha = r)")
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    parser.add_argument(
        "--model", "--model.path", dest="model", default=None, help="HF folder or .gguf file (default: lorakit's default)"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        help=f"default: {' '.join(DEFAULT_VARIANTS)} (peft if installed)",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per worker")
    parser.add_argument(
        "--device", default="auto", help="auto (default: a CUDA GPU if present), cpu, cuda or cuda:N"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        help="the base's dtype: auto (bf16 on a GPU and on a CPU with native bf16, else fp32), float32, bfloat16",
    )
    parser.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="non-reentrant gradient checkpointing in every variant",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke check: batch 1, seq 32, 1 round, 2 steps (overrides those options)",
    )
    parser.add_argument(
        "--write-docs", action="store_true", help="update the bench_step section of the --docs file"
    )
    parser.add_argument(
        "--tag", default="", help="name of the docs section to write (several configurations side by side)"
    )
    parser.add_argument("--json", type=Path, help="also write every worker's raw result to this file")
    parser.add_argument("--docs", type=Path, default=DOCS, help="the file --write-docs updates")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if not args.variants:
        args.variants = [v for v in DEFAULT_VARIANTS if v != "peft" or version("peft") != "not installed"]
    args.variants = list(dict.fromkeys(args.variants))  # drop repeats, keep order
    return args


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    args = parse_args(argv, prog)
    if args.worker:
        print(json.dumps(run_worker(args)), flush=True)
        return

    print(
        f"CPU: {cpu_name()}, torch CPU capability {torch_capability()}; base dtype {resolved_dtype(args)}",
        file=sys.stderr,
    )
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        print(f"warning: load average {load_before:.2f} > 0.5; timings will be disturbed", file=sys.stderr)
    rounds = run_rounds(args)
    table, ratios = summarize(rounds, args.variants)
    if args.json:
        args.json.write_text(json.dumps({"command": display_command(), "rounds": rounds}, indent=1) + "\n")
    print(table)
    if sentence := interpretation(ratios):
        print(f"\n{sentence}")
    if args.write_docs:
        tag = f"bench_step-{args.tag}" if args.tag else "bench_step"
        section = docs_section(args, table, ratios, load_before)
        write_docs(args.docs, section, f"<!-- {tag}:start -->", f"<!-- {tag}:end -->")
        print(f"\nupdated {args.docs}")


if __name__ == "__main__":
    main()
