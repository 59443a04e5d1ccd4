"""Benchmark: mixed-adapter batches on the default model, against one merged adapter and PEFT's `adapter_names`.

A batch of `--batch` rows (default 32) where row i uses adapter i mod N, for N distinct adapters (default 1, 4,
16, 32; r=16 on all seven projections, random non-zero weights). For each N, three ways of running it, interleaved
and repeated `--repeats` times (medians reported):

* ``merged``: one adapter merged into the base weights, plain forward: the speed of the base model itself, the
  reference the issue sets (what a server with a single adapter would do);
* ``lorakit``: ``AdapterBank.use(names)``, i.e. the stacked mixed-adapter forward;
* ``peft``: PEFT's mixed batch, ``model(..., adapter_names=names)`` / ``generate(..., adapter_names=names)``.

Prefill is one forward over `--batch` × `--prompt` tokens that keeps only the last position's logits (as
generation does; median of 2 calls); decode is one greedy step of all rows with the KV cache (median over `--new`
steps). Throughput is tokens per second (medians over repeats); the ratio columns are lorakit (or PEFT) over
merged, paired within each repeat: median [min–max] over repeats, so drift of the machine between repeats cancels.

Also measured: adapter switch latency (``AdapterBank.activate``, a pointer change; median of 200) and the time to
load an r=16 all-linear adapter from disk (median of 5).

    .venv/bin/python benchmarks/bench_mixed.py [--write-docs] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import lorakit
from lorakit.bank import AdapterBank
from lorakit.bench import cpu_name, display_command, gpu_name, version, write_docs
from lorakit.device import dtype_name, placement

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
START, END = "<!-- bench_mixed:start -->", "<!-- bench_mixed:end -->"


def make_adapters(model, n: int, r: int, out: Path) -> list[Path]:
    """n random adapters saved as PEFT folders (non-zero B, so every adapter changes the output)."""
    dirs = []
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=r, targets=TARGETS), name="tmp")
        with torch.no_grad():
            for p in lorakit.adapter_parameters(model, "tmp"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        dirs.append(lorakit.save_adapter(model, out / f"a{i}", name="tmp"))
        lorakit.delete_adapter(model, "tmp")
    return dirs


def sync() -> None:
    """Wait for the GPU (its work is asynchronous), so that host clocks time the work itself."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int = 1) -> float:
    best = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best.append(time.perf_counter() - t0)
    return statistics.median(best)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens per row")
    ap.add_argument("--new", type=int, default=8, help="decode steps timed")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: batch 4, prompt 8, new 2, N 1 2, 1 repeat"
    )
    ap.add_argument("--model", help="HF folder or .gguf file (default: lorakit's default model)")
    ap.add_argument("--device", default="auto", help="auto (a CUDA GPU if there is one), cpu, cuda or cuda:N")
    ap.add_argument(
        "--dtype", default="auto", help="auto (bf16 on a GPU, fp32 on the CPU), float32, bfloat16"
    )
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--plot", type=Path, default=Path("docs/bench_mixed.png"))
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.prompt, args.new, args.adapters, args.repeats = 4, 8, 2, [1, 2], 1
    load_before = os.getloadavg()[0]
    torch.manual_seed(0)
    device, dtype = placement(args.device, args.dtype)
    model, tok = lorakit.load_model(args.model, dtype=dtype, device=device)
    model.eval()
    tmp = Path(tempfile.mkdtemp(prefix="bench_mixed-"))
    n_max = max(args.adapters)
    dirs = make_adapters(model, n_max, args.r, tmp)
    bank = AdapterBank(model)
    load_s = [bank.load(f"a{i}", d) for i, d in enumerate(dirs)]
    ids = torch.randint(
        100, model.config.vocab_size, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1)
    ).to(device)
    mask = torch.ones_like(ids)
    gen = dict(do_sample=False, pad_token_id=tok.pad_token_id or 0)

    peft_model = None
    if not args.no_peft:
        import peft

        base2, _ = lorakit.load_model(args.model, dtype=dtype, device=device)
        peft_model = peft.PeftModel.from_pretrained(base2, str(dirs[0]), adapter_name="a0")
        for i, d in enumerate(dirs[1:], start=1):
            peft_model.load_adapter(str(d), adapter_name=f"a{i}")
        peft_model.eval()

    def run_lorakit(names, kind):
        with bank.use(names):
            return _work(model, ids, mask, kind, args.new, gen)

    def run_merged(kind):
        bank.activate("a0")
        lorakit.merge(model)
        try:
            return _work(model, ids, mask, kind, args.new, gen)
        finally:
            lorakit.unmerge(model)
            bank.activate(None)

    def run_peft(names, kind):
        return _work(peft_model, ids, mask, kind, args.new, gen, adapter_names=names)

    rows = []
    with torch.no_grad():
        for n in args.adapters:
            names = [f"a{i % n}" for i in range(args.batch)]
            res: dict[str, dict[str, list[float]]] = {}
            for rep in range(args.repeats):
                order = ["merged", "lorakit", "peft"] if peft_model else ["merged", "lorakit"]
                order = order[rep % len(order) :] + order[: rep % len(order)]
                for way in order:
                    for kind in ("prefill", "decode"):
                        fn = {
                            "merged": lambda k=kind: run_merged(k),
                            "lorakit": lambda k=kind, ns=names: run_lorakit(ns, k),
                            "peft": lambda k=kind, ns=names: run_peft(ns, k),
                        }[way]
                        res.setdefault(way, {}).setdefault(kind, []).append(fn())
            row = {"n": n}
            for way, kinds in res.items():
                for kind, secs in kinds.items():
                    tokens = args.batch * (args.prompt if kind == "prefill" else 1)
                    row[f"{way}_{kind}"] = tokens / statistics.median(secs)
                    if way != "merged":  # paired ratios: throughput / merged's in the same repeat
                        pairs = [m / t for m, t in zip(res["merged"][kind], secs, strict=True)]
                        row[f"{way}_{kind}_ratio"] = (statistics.median(pairs), min(pairs), max(pairs))
            rows.append(row)
            print(_row_text(row), file=sys.stderr, flush=True)

    bank.activate("a0")
    t_switch = []
    for i in range(200):
        t0 = time.perf_counter()
        bank.activate(f"a{i % n_max}")
        t_switch.append(time.perf_counter() - t0)
    table = _table(rows, peft_model is not None)
    extra = (
        f"- adapter switch (`AdapterBank.activate`): median {1e3 * statistics.median(t_switch):.3f} ms, "
        f"max {1e3 * max(t_switch):.3f} ms over 200 switches\n"
        f"- adapter load from disk (r={args.r}, 7 projections × 30 layers, "
        f"{sum(p.numel() for p in lorakit.adapter_parameters(model, 'a0')):,} parameters): "
        f"median {1e3 * statistics.median(load_s[:5]):.0f} ms"
    )
    print(table + "\n\n" + extra)
    plot = _plot(rows, args.plot, peft_model is not None)
    if args.write_docs:
        section = "\n".join(
            [
                "## Mixed-adapter batches: lorakit vs one merged adapter vs PEFT `adapter_names`",
                "",
                f"- machine: {cpu_name()}{gpu_name(args.device)}, torch {version('torch')}, "
                f"transformers {version('transformers')}, "
                f"peft {version('peft')}",
                f"- command: `{display_command()}`",
                f"- setup: {args.model or 'default model (SmolLM2-135M-Instruct)'}, {dtype_name(dtype)} on {device}, "
                f"batch {args.batch}, prompt {args.prompt} "
                f"tokens, {args.new} decode steps, r={args.r} on 7 projections, row i uses adapter i mod N; "
                f"throughput in tokens/s, medians of {args.repeats} interleaved repeats; ratios: median [min–max] of "
                "the per-repeat ratios to merged",
                f"- 1-minute load average before the run: {load_before:.2f}",
                "",
                table,
                "",
                extra,
                "",
                f"![mixed-adapter throughput]({plot.name})" if plot else "",
            ]
        )
        write_docs(DOCS, section, START, END)
        print(f"updated {DOCS}")


def _work(model, ids, mask, kind, new, gen, **extra) -> float:
    """Prefill: seconds per forward (median of 2). Decode: seconds per greedy step of the whole batch with the KV
    cache (median over `new` steps)."""
    if kind == "prefill":
        return timed(lambda: model(input_ids=ids, attention_mask=mask, logits_to_keep=1, **extra), repeats=2)
    from transformers import DynamicCache

    cache = DynamicCache()
    kw = dict(past_key_values=cache, use_cache=True, logits_to_keep=1, **extra)
    out = model(input_ids=ids, attention_mask=mask, **kw)
    steps = []
    for _ in range(new):
        nxt = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=nxt, attention_mask=mask, **kw)
        sync()
        steps.append(time.perf_counter() - t0)
    return statistics.median(steps)


def _row_text(row) -> str:
    return ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())


def _table(rows, with_peft: bool) -> str:
    head = (
        "| N adapters | merged prefill | lorakit prefill | ratio | merged decode | lorakit decode | ratio |"
    )
    sep = "|---:|---:|---:|---:|---:|---:|---:|"
    if with_peft:
        head += " PEFT prefill | ratio | PEFT decode | ratio |"
        sep += "---:|---:|---:|---:|"
    out = [head, sep]
    for r in rows:
        line = (
            f"| {r['n']} | {r['merged_prefill']:.0f} | {r['lorakit_prefill']:.0f} | {_ratio(r['lorakit_prefill_ratio'])} "
            f"| {r['merged_decode']:.1f} | {r['lorakit_decode']:.1f} | {_ratio(r['lorakit_decode_ratio'])} |"
        )
        if with_peft:
            line += (
                f" {r['peft_prefill']:.0f} | {_ratio(r['peft_prefill_ratio'])} "
                f"| {r['peft_decode']:.1f} | {_ratio(r['peft_decode_ratio'])} |"
            )
        out.append(line)
    return "\n".join(out)


def _ratio(stats: tuple[float, float, float]) -> str:
    med, lo, hi = stats
    return f"{med:.2f}× [{lo:.2f}–{hi:.2f}]"


def _plot(rows, path: Path, with_peft: bool) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ns = [r["n"] for r in rows]
    for ax, kind in zip(axes, ("prefill", "decode"), strict=True):
        for way in ("lorakit", "peft") if with_peft else ("lorakit",):
            med = [r[f"{way}_{kind}_ratio"][0] for r in rows]
            err = [
                [m - r[f"{way}_{kind}_ratio"][1] for m, r in zip(med, rows, strict=True)],
                [r[f"{way}_{kind}_ratio"][2] - m for m, r in zip(med, rows, strict=True)],
            ]
            ax.errorbar(ns, med, yerr=err, fmt="o-", capsize=3, label=way)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="one merged adapter")
        ax.axhline(0.8, color="red", lw=0.8, ls=":", label="target 0.8×")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("distinct adapters in the batch")
        ax.set_ylabel("throughput / merged")
        ax.set_title(kind)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
