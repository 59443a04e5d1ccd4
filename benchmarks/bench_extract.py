"""`lorakit extract` at billion-parameter scale: time, peak memory and error of the full and the randomised SVD.

The base is a random-weight checkpoint of a real shape (`random_checkpoint.py`, bf16 shards); the "fine-tuned"
model is the base plus N(0, 1e-3) noise on every tensor, written next to it once (a full-rank ΔW everywhere,
like a full fine-tune's, and the worst case for a truncation). Each extraction runs in its own process, which
reports its wall time and peak RSS. Cost only, never quality: the weights are random.

    .venv/bin/python benchmarks/bench_extract.py [--shape smollm2-1.7b] [--rank 16] [--niter 2] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_step import write_docs  # noqa: E402
from random_checkpoint import checkpoint  # noqa: E402


def tuned_copy(base: Path, out: Path, std: float = 1e-3) -> Path:
    """`base` plus N(0, std) noise on every tensor, shard by shard (one shard in memory at a time)."""
    import torch
    from safetensors.torch import load_file, save_file

    if (out / "config.json").is_file():
        return out
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-tuned-", dir=out.parent))
    g = torch.Generator().manual_seed(1)
    for f in sorted(base.iterdir()):
        if f.suffix == ".safetensors":
            tensors = load_file(f)
            for k, t in tensors.items():
                tensors[k] = (t.float() + torch.randn(t.shape, generator=g) * std).to(t.dtype)
            save_file(tensors, tmp / f.name, metadata={"format": "pt"})
        elif f.is_file():
            shutil.copy(f, tmp / f.name)
    os.rename(tmp, out)
    return out


def child(base: str, tuned: str, out: str, rank: int, niter: int | None) -> None:
    from lorakit.extract import extract

    t0 = time.perf_counter()
    done = extract(base, tuned, out, r=rank, niter=niter)
    seconds = time.perf_counter() - t0
    errors = [m.error for m in done.loras]
    result = {
        "seconds": seconds,
        "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "modules": len(done.loras),
        "mean_error": sum(errors) / len(errors),
        "numbers": done.parameters,
        "base_numbers": done.base_parameters,
    }
    Path(out, "bench.json").write_text(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="smollm2-1.7b")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--niter", type=int, default=2)
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        base, tuned, out, rank, niter = args.child
        child(base, tuned, out, int(rank), None if niter == "-" else int(niter))
        return
    import torch

    base = checkpoint(args.shape)
    tuned = tuned_copy(base, base.parent / f"{base.name}-tuned")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, niter in (("full SVD", "-"), (f"randomised, niter={args.niter}", str(args.niter))):
            out = Path(tmp) / name.split()[0].rstrip(",")
            cmd = [
                sys.executable,
                __file__,
                "--child",
                str(base),
                str(tuned),
                str(out),
                str(args.rank),
                niter,
            ]
            print(name, file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True)
            rows[name] = json.loads((out / "bench.json").read_text())
    first = next(iter(rows.values()))
    lines = [
        f"{first['modules']} modules as LoRA at rank {args.rank}: {first['numbers']:,} numbers, "
        f"{100 * first['numbers'] / first['base_numbers']:.2f}% of the model's {first['base_numbers']:,}.\n",
        "| SVD | time, s | peak RSS, GB | mean ‖ΔW−BA‖/‖ΔW‖ |",
        "|---|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['seconds']:.0f} | {r['rss']:.2f} | {r['mean_error']:.4f} |")
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        cmd = " ".join(["python benchmarks/bench_extract.py", *sys.argv[1:]])
        section = (
            f"## Extraction at scale: {args.shape}, full vs randomised SVD\n\n"
            f"- command: `{cmd}`\n"
            f"- setup: random-weight bf16 checkpoint of {args.shape}'s shape; the tuned model is it plus "
            f"N(0, 1e-3) noise on every tensor (full-rank ΔW); r={args.rank}, every changed weight; "
            f"{os.cpu_count()} CPUs ({torch.backends.cpu.get_cpu_capability()}). Time includes reading both "
            "checkpoints; peak RSS is the extracting process's. Cost only: the errors of noise say nothing "
            "about a real fine-tune's.\n\n" + table
        )
        docs = Path(__file__).parent.parent / "docs" / "benchmarks.md"
        write_docs(docs, section, "<!-- bench_extract:start -->", "<!-- bench_extract:end -->")


if __name__ == "__main__":
    main()
