"""ensure_weight_tying on the real default model: SmolLM2-135M ties its output head to its input embedding.

Two `lorakit train` runs at the defaults of the main job (the built-in task), each with LoRA on the seven
projections and on `embed_tokens`:
- tied (`--lora.ensure_weight_tying true`): the head's update is the embedding's, transposed;
- untied (PEFT's default): the embedding alone gets the update, the head keeps the base weight.
For each: trainable parameters, accuracy and eval loss before and after, training time and peak memory (from the
run's summary.json), then `lorakit merge` and the merged folder's size and `tie_word_embeddings`, and the merged
model as an f16 GGUF (`lorakit export gguf --merged`) and its size. With `--rounds N` the two trainings alternate
N times (the order turning each round) and the table gives the median training time; the rest is round 1's.

    .venv/bin/python benchmarks/bench_tying.py --out /tmp/tying --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]
LORAKIT = [sys.executable, "-m", "lorakit"]


def _run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 1e6


def train(out: Path, tied: bool, round_: int) -> dict:
    run = out / f"{'tied' if tied else 'untied'}_{round_}"
    _run(
        [
            *LORAKIT,
            "train",
            "--lora.targets",
            json.dumps(TARGETS),
            "--lora.ensure_weight_tying",
            "true" if tied else "false",
            "--train.out_dir",
            str(run),
        ]
    )
    return json.loads((run / "summary.json").read_text())


def one(out: Path, summary: dict, seconds: list[float]) -> dict:
    run = Path(summary["run_dir"])
    merged = out / f"merged_{run.name}"
    _run([*LORAKIT, "merge", "--adapter", summary["adapter"], "--out", str(merged)])
    gguf = out / f"merged_{run.name}.gguf"
    _run(
        [
            *LORAKIT,
            "export",
            "gguf",
            "--merged",
            "--adapter",
            summary["adapter"],
            "--out",
            str(gguf),
            "--outtype",
            "f16",
        ]
    )
    return {
        "trainable": summary["trainable"],
        "accuracy": (summary["before"].get("accuracy"), summary["after"].get("accuracy")),
        "eval_loss": (summary["before"]["loss"], summary["after"]["loss"]),
        "train_seconds": statistics.median(seconds),
        "dtype": yaml.safe_load((run / "config.yaml").read_text())["model"]["dtype"],
        "peak_rss_gb": summary["peak_rss_gb"],
        "adapter_mb": _size_mb(Path(summary["adapter"]) / "adapter_model.safetensors"),
        "merged_mb": _size_mb(merged),
        "merged_tied": json.loads((merged / "config.json").read_text()).get("tie_word_embeddings"),
        "gguf_f16_mb": _size_mb(gguf),
    }


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    head = (
        f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; CPU {platform.processor() or platform.machine()}, "
        f"capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
        f"1-minute load average before: {os.getloadavg()[0]:.2f}; {args.rounds} round(s)"
    )
    runs: dict[str, list[dict]] = {"tied": [], "untied": []}
    for i in range(args.rounds):
        for name in ("tied", "untied") if i % 2 == 0 else ("untied", "tied"):
            runs[name].append(train(args.out, name == "tied", i))
    results = {
        name: one(args.out, done[0], [d["train_seconds"] for d in done]) for name, done in runs.items()
    }
    print("\n" + head + f"; base dtype {results['tied']['dtype']} (--model.dtype auto)")
    print(
        "| run | trainable | accuracy before → after | eval loss before → after | train s | peak RSS GB | adapter MB "
        "| merged folder MB | merged tied | merged f16 GGUF MB |"
    )
    print("|---|---:|---|---|---:|---:|---:|---:|---|---:|")
    for name, r in results.items():
        acc = " → ".join(f"{a:.1%}" if a is not None else "-" for a in r["accuracy"])
        loss = " → ".join(f"{v:.4f}" for v in r["eval_loss"])
        secs = f"{r['train_seconds']:.0f}" if isinstance(r["train_seconds"], (int, float)) else "-"
        print(
            f"| {name} | {r['trainable']:,} | {acc} | {loss} | {secs} | {r['peak_rss_gb']:.2f} | {r['adapter_mb']:.1f} "
            f"| {r['merged_mb']:.1f} | {r['merged_tied']} | {r['gguf_f16_mb']:.1f} |"
        )
    print(f"1-minute load average after: {os.getloadavg()[0]:.2f}")
    (args.out / "results.json").write_text(json.dumps({"head": head, **results}, indent=2))


if __name__ == "__main__":
    main()
