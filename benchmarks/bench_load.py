"""Loading adapters one after another into one model: `lorakit.load_adapter` against PEFT's `load_adapter`.

A collection grows by loads: a server loading adapters on demand, a notebook comparing checkpoints. Each load
should cost the same whether the model holds 1 adapter or 32. This benchmark saves `--adapters` random adapters
(r=`--rank` on every linear layer of the default model, fp32), then, in one process per tool, loads them all into
one model in turn, timing each load (file read, checks, wrappers, values), then deletes one adapter with all of
them loaded. Processes alternate between the tools, `--rounds` rounds each. Each process also computes the logits
of the last adapter loaded on a fixed prompt; the two tools' logits must agree (atol 1e-4 on logits ~20), or the
benchmark fails.

Reported: the time of load k (k = 1, 2, 8, 16, 32), a process's median load, all loads, and the delete, each the
median over rounds, and the ratio lorakit / PEFT of the medians; with `--write-docs`, a plot of each load's time
against k.

The spikes in that plot are Python's full garbage collections, which loads trigger now and then, each scanning
every object alive: the model's included. A last process measures such a collection with the model
and 2 adapters loaded, then again after `gc.freeze()` (what `lorakit serve` does once it has started) and 8 more
loads: 3 collections each, the median.

    .venv/bin/python benchmarks/bench_load.py                       # 32 adapters, r=16, 3 rounds
    .venv/bin/python benchmarks/bench_load.py --write-docs          # also update docs/benchmarks.md and the plot

The machine should be idle (`uptime`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from random_adapters import save_random  # noqa: E402

DOCS = Path("docs") / "benchmarks.md"
PLOT = Path("docs") / "bench_load.png"
START, END = "<!-- bench_load:start -->", "<!-- bench_load:end -->"
PROMPT = [[1, 504, 3458, 314, 260, 1345, 282, 4236, 30, 2114, 6772, 28]]
TOOLS = ("lorakit", "peft")
ATOL = 1e-4  # fp32 logits of size ~20, one adapter's update summed in a different order by each tool


def make_adapters(n: int, rank: int, root: Path) -> list[Path]:
    """`n` adapters with random A and B (B nonzero, so that each changes the output), saved under root/a{i}."""
    import torch

    import lorakit

    model, _ = lorakit.load_model(dtype=torch.float32)
    config = lorakit.LoraConfig(r=rank, alpha=2 * rank, targets="all-linear")
    return save_random(model, [root / f"a{i}" for i in range(n)], config, std=0.02)


def child(tool: str, root: Path, n: int, out: Path) -> None:
    """Load root/a0 .. a{n-1} into one model with `tool`, timing each; then the last one's logits and a delete."""
    import torch
    from safetensors.torch import save_file

    import lorakit

    model, _ = lorakit.load_model(dtype=torch.float32)
    model.eval()
    dirs = [root / f"a{i}" for i in range(n)]
    times = []
    if tool == "lorakit":
        for i, d in enumerate(dirs):
            t0 = time.perf_counter()
            lorakit.load_adapter(model, d, f"a{i}")
            times.append(time.perf_counter() - t0)
        lorakit.set_active(model, f"a{n - 1}")
        run, delete = model, lambda: lorakit.delete_adapter(model, f"a{n // 2}")
    else:
        import peft

        t0 = time.perf_counter()
        run = peft.PeftModel.from_pretrained(model, str(dirs[0]), adapter_name="a0")
        times.append(time.perf_counter() - t0)
        for i, d in enumerate(dirs[1:], start=1):
            t0 = time.perf_counter()
            run.load_adapter(str(d), adapter_name=f"a{i}")
            times.append(time.perf_counter() - t0)
        run.set_adapter(f"a{n - 1}")
        run.eval()
        delete = lambda: run.delete_adapter(f"a{n // 2}")  # noqa: E731
    with torch.no_grad():
        logits = run(torch.tensor(PROMPT)).logits
    t0 = time.perf_counter()
    delete()
    deleted = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    save_file({"logits": logits.contiguous()}, str(out / f"{tool}.safetensors"))
    (out / f"{tool}.json").write_text(json.dumps({"loads": times, "delete": deleted, "rss_gb": rss}))


def gc_child(root: Path, out: Path) -> None:
    """A full collection's time with the model and 2 adapters loaded, then after gc.freeze() and 8 more loads."""
    import gc

    import lorakit

    model, _ = lorakit.load_model()
    for i in range(2):
        lorakit.load_adapter(model, root / f"a{i}", f"s{i}")

    def collections() -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            gc.collect()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    objects, before = len(gc.get_objects()), collections()
    gc.freeze()
    n = len(list(root.iterdir()))
    for i in range(8):
        lorakit.load_adapter(model, root / f"a{(i + 2) % n}", f"r{i}")
    result = {"objects": objects, "before": before, "after": collections(), "frozen": gc.get_freeze_count()}
    result["unfrozen"] = len(gc.get_objects())
    (out / "gc.json").write_text(json.dumps(result))


def run_child(tool: str, root: Path, n: int, out: Path) -> dict:
    print(f"  {tool} ...", file=sys.stderr, flush=True)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        tool,
        "--root",
        str(root),
        "--adapters",
        str(n),
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / f"{tool}.json").read_text())


def marks(n: int) -> list[int]:
    return [k for k in (1, 2, 8, 16, 32, 64, 128) if k <= n] + (
        [n] if n not in (1, 2, 8, 16, 32, 64, 128) else []
    )


def report(
    runs: dict[str, list[dict]], n: int, rank: int, rounds: int, gap: float, load_before: float
) -> str:
    import peft
    import torch

    med = {t: [statistics.median(r["loads"][k] for r in runs[t]) for k in range(n)] for t in TOOLS}
    total = {t: statistics.median(sum(r["loads"]) for r in runs[t]) for t in TOOLS}
    delete = {t: statistics.median(r["delete"] for r in runs[t]) for t in TOOLS}
    typical = {t: statistics.median(statistics.median(r["loads"]) for r in runs[t]) for t in TOOLS}
    rss = {t: max(r["rss_gb"] for r in runs[t]) for t in TOOLS}
    cmd = (
        "`.venv/bin/python benchmarks/bench_load.py"
        + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
        + "`"
    )
    lines = [
        "## Loading adapters into one model, one after another: lorakit vs PEFT `load_adapter`",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, peft {peft.__version__}; 1-minute load average before the run: {load_before:.2f}",
        f"- command: {cmd}",
        f"- setup: SmolLM2-135M-Instruct, fp32; {n} adapters of r={rank} on every linear layer (210 modules each), "
        "random weights; one process per tool and round, loading all of them in turn into one model, "
        f"the tools alternating, {rounds} round{'s' if rounds > 1 else ''}; times are medians over rounds; PEFT's first load is "
        "`PeftModel.from_pretrained`. The last adapter's logits agreed between the tools to "
        f"{gap:.1e} (max abs. difference).",
        "",
        "| | "
        + " | ".join(f"load {k}" for k in marks(n))
        + f" | median load | all {n} loads | delete 1 of {n} | peak RSS, GB |",
        "|---|" + "---:|" * (len(marks(n)) + 4),
    ]
    for t, label in (("lorakit", "lorakit `load_adapter`, ms"), ("peft", "PEFT `load_adapter`, ms")):
        cells = [f"{med[t][k - 1] * 1e3:.0f}" for k in marks(n)]
        lines.append(
            f"| {label} | "
            + " | ".join(cells)
            + f" | {typical[t] * 1e3:.0f} | {total[t]:.2f} s | {delete[t] * 1e3:.0f} | {rss[t]:.2f} |"
        )
    cells = [f"{med['lorakit'][k - 1] / med['peft'][k - 1]:.2f}×" for k in marks(n)]
    lines.append(
        "| lorakit / PEFT | "
        + " | ".join(cells)
        + f" | {typical['lorakit'] / typical['peft']:.2f}× | {total['lorakit'] / total['peft']:.2f}×"
        + f" | {delete['lorakit'] / delete['peft']:.2f}× | "
        f"{rss['lorakit'] / rss['peft']:.2f}× |"
    )
    return "\n".join(lines)


def plot(runs: dict[str, list[dict]], n: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ks = range(1, n + 1)
    for t, label in (("lorakit", "lorakit load_adapter"), ("peft", "PEFT load_adapter")):
        ax.plot(
            ks,
            [statistics.median(r["loads"][k - 1] for r in runs[t]) * 1e3 for k in ks],
            marker=".",
            label=label,
        )
    ax.set_xlabel("adapter loaded (k-th into the same model)")
    ax.set_ylabel("load time, ms (median over rounds)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--adapters", type=int, default=32, help="adapters loaded into one model, one after another"
    )
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="processes per tool, alternating")
    ap.add_argument(
        "--write-docs", action="store_true", help="update docs/benchmarks.md and docs/bench_load.png"
    )
    ap.add_argument("--child", choices=(*TOOLS, "gc"), help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "gc":
        gc_child(args.root, args.out)
        return
    if args.child:
        child(args.child, args.root, args.adapters, args.out)
        return
    if args.adapters < 2 or args.rank < 1 or args.rounds < 1:
        ap.error("--adapters must be at least 2, --rank and --rounds at least 1")
    from safetensors.torch import load_file

    load_before = os.getloadavg()[0]
    if load_before > 1:
        print(f"warning: 1-minute load average {load_before:.2f}; timings may be noisy", file=sys.stderr)
    runs: dict[str, list[dict]] = {t: [] for t in TOOLS}
    gap = 0.0
    with tempfile.TemporaryDirectory(prefix="bench_load-") as tmp:
        root = Path(tmp) / "adapters"
        print(f"saving {args.adapters} adapters ...", file=sys.stderr, flush=True)
        make_adapters(args.adapters, args.rank, root)
        for i in range(args.rounds):
            print(f"round {i + 1}/{args.rounds}", file=sys.stderr, flush=True)
            out = Path(tmp) / f"round{i}"
            out.mkdir()
            for t in TOOLS if i % 2 == 0 else TOOLS[::-1]:
                runs[t].append(run_child(t, root, args.adapters, out))
            a, b = (load_file(str(out / f"{t}.safetensors"))["logits"] for t in TOOLS)
            gap = max(gap, float((a - b).abs().max()))
        print("garbage collection ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--child", "gc", "--root", str(root), "--out", tmp]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        collected = json.loads((Path(tmp) / "gc.json").read_text())
    if gap > ATOL:
        sys.exit(
            f"bench_load: the last adapter's logits differ between lorakit and PEFT by {gap:.2e} (> {ATOL})"
        )
    text = report(runs, args.adapters, args.rank, args.rounds, gap, load_before)
    text += (
        f"\n\nA full garbage collection (`gc.collect()`, median of 3) with the model and 2 adapters loaded "
        f"({collected['objects']:,} objects): {collected['before'] * 1e3:.0f} ms; after `gc.freeze()`, as `lorakit "
        f"serve` does at start-up, and 8 more loads ({collected['unfrozen']:,} objects not frozen): "
        f"{collected['after'] * 1e3:.1f} ms. The spikes in the plot are such collections, which the loads trigger."
    )
    print(text)
    if args.write_docs:
        plot(runs, args.adapters, PLOT)
        from lorakit.bench import write_docs

        write_docs(DOCS, text + f"\n\n![load time against adapters loaded]({PLOT.name})", START, END)
        print(f"wrote {DOCS} and {PLOT}")


if __name__ == "__main__":
    main()
