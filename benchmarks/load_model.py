"""Benchmark: load the default model from its GGUF file (fresh conversion) vs from the cached HF folder.

Usage: python benchmarks/load_model.py [--repeats 5]

Both measurements use a throw-away cache directory, so the user's cache is neither used nor modified.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch
import transformers

from lorakit.models import default_gguf_path, load_model, resolve_model_dir


def time_load(cache_dir: str) -> float:
    """Seconds for one ``load_model()`` call against ``cache_dir``."""
    start = time.perf_counter()
    model, tokenizer = load_model(cache_dir=cache_dir)
    elapsed = time.perf_counter() - start
    del model, tokenizer
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="cached loads to take the median of")
    args = parser.parse_args()

    gguf = default_gguf_path()
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as cache_dir:
        fresh = time_load(cache_dir)  # empty cache: GGUF parse + dequantise + save + load
        cached_runs = [time_load(cache_dir) for _ in range(args.repeats)]
        folder = resolve_model_dir(None, cache_dir)
        size_mb = sum(p.stat().st_size for p in folder.iterdir()) / 1e6

    cached = statistics.median(cached_runs)
    print(
        f"model: {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB GGUF -> {size_mb:.0f} MB cached HF folder)"
    )
    print(
        f"env: python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {torch.get_num_threads()} threads\n"
    )
    print("| load path | seconds |")
    print("|---|---:|")
    print(f"| GGUF file, fresh (convert + cache + load) | {fresh:.2f} |")
    print(f"| cached HF folder (median of {args.repeats}) | {cached:.2f} |")
    print(f"\ncached runs: {', '.join(f'{t:.2f}' for t in cached_runs)}")
    print(f"speed-up: {fresh / cached:.0f}x")


if __name__ == "__main__":
    main()
