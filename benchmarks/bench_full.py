"""LoRA against full fine-tuning on the built-in task, and LoRA adapters extracted from the full fine-tune.

The same data, batches, schedule, seed and steps (lorakit's own training loop, `lorakit.train.loop.train_loop`),
once with a LoRA adapter (`lorakit train`'s defaults: r=16, alpha=32, all-linear, lr 2e-3) and once with every
weight trainable (AdamW at each of `--full-lr`: full fine-tuning wants a far smaller rate). Then `lorakit.extract`
turns the best full fine-tune into adapters of each `--ranks` (every changed weight, norms copied), which are
evaluated on the base. Reports exact-match accuracy and eval loss, trainable parameters, training time and the
process's peak RSS for each, and the extraction's time and its largest relative error ‖ΔW − B·A‖/‖ΔW‖.

    .venv/bin/python benchmarks/bench_full.py [--steps 40] [--full-lr 2e-5 1e-4] [--ranks 16 64] [--write-docs]

With `--train-file` and `--eval-file` (JSONL, as `lorakit train` reads them) it trains on that data instead, and
accuracy is not measured (exact match means nothing for open-ended replies; eval loss is the measure). The real
chat set: `python benchmarks/chat_corpus.py --out /tmp/chat`, then `--train-file /tmp/chat/train.jsonl
--eval-file /tmp/chat/eval.jsonl`.

Each training run is its own process (peak RSS is per process); the machine should be idle (`uptime`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_step import write_docs  # noqa: E402


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def _data_overrides() -> list[str]:
    """The data settings the parent passed to its children (empty: the built-in task)."""
    return json.loads(os.environ.get("BENCH_FULL_DATA", "[]"))


def _setup(cfg):
    import lorakit
    from lorakit.train.datasets import encode_examples
    from lorakit.train.run import evaluate

    model, tok = lorakit.load_model(cfg.model.path)
    data = encode_examples(cfg, tok, lambda s: None)

    def measure(m) -> dict:
        return evaluate(m, tok, data.eval_rows, data.eval_examples, cfg, can_merge=False)

    return model, tok, data, measure


def train_one(kind: str, steps: int, lr: float | None, out: Path) -> None:
    """One training run in this process; writes out/result.json (and, for a full fine-tune, the model)."""
    from lorakit.train.config import load_config
    from lorakit.train.loop import train_loop
    from lorakit.train.methods import make_method

    overrides = ["--train.steps", str(steps), "--train.save_every", "0", "--train.out_dir", str(out)]
    overrides += _data_overrides()
    if lr is not None:
        overrides += ["--train.lr", str(lr)]
    cfg = load_config(None, overrides)
    model, tok, data, measure = _setup(cfg)
    before = measure(model)
    method = make_method(cfg)
    if kind == "lora":
        method.prepare(model, None)  # `lorakit train`'s own adapter
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    t0 = time.perf_counter()
    train_loop(model, data.train_rows, cfg, pad_id=tok.pad_token_id, out_dir=out, method=method)
    seconds = time.perf_counter() - t0
    after = measure(model)
    if kind == "full":
        model.save_pretrained(out / "model")
    result = {
        "before": before,
        "after": after,
        "trainable": trainable,
        "seconds": seconds,
        "rss": _peak_rss_gb(),
    }
    (out / "result.json").write_text(json.dumps(result))


def extract_one(folder: Path, r: int, out: Path) -> None:
    import lorakit
    from lorakit.extract import extract
    from lorakit.train.config import load_config

    t0 = time.perf_counter()
    done = extract(None, folder, out / "adapter", r=r)
    seconds = time.perf_counter() - t0
    cfg = load_config(None, _data_overrides())
    model, _, _, measure = _setup(cfg)
    lorakit.load_adapter(model, out / "adapter")
    result = {
        "after": measure(model),
        "trainable": done.parameters,
        "seconds": seconds,
        "error": done.max_error,
        "rss": _peak_rss_gb(),
    }
    (out / "result.json").write_text(json.dumps(result))


def _child(args: list[str]) -> dict:
    print(" ".join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, __file__, "--child", *args], check=True, stdout=subprocess.DEVNULL)
    return json.loads((Path(args[-1]) / "result.json").read_text())


def _pct(m: dict) -> str:
    return f"{100 * m['accuracy']:.1f}%" if "accuracy" in m else "–"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--full-lr", type=float, nargs="+", default=[2e-5, 1e-4])
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    p.add_argument("--train-file", help="JSONL training data instead of the built-in task (with --eval-file)")
    p.add_argument("--eval-file", help="JSONL eval data; eval loss only, no accuracy")
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if (args.train_file is None) != (args.eval_file is None):
        p.error("--train-file and --eval-file go together")
    if args.train_file and not args.child:
        data = ["--data.train_file", args.train_file, "--data.eval_file", args.eval_file, "--eval.limit", "0"]
        os.environ["BENCH_FULL_DATA"] = json.dumps(data)
    if args.child:
        kind, *rest = args.child
        if kind == "extract":
            extract_one(Path(rest[0]), int(rest[1]), Path(rest[2]))
        else:
            train_one(kind, int(rest[0]), None if rest[1] == "-" else float(rest[1]), Path(rest[2]))
        return
    rows: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        lora = _child(["lora", str(args.steps), "-", f"{tmp}/lora"])
        rows.append(("LoRA r=16 (lr 2e-3)", lora))
        full = {}
        for lr in args.full_lr:
            full[lr] = _child(["full", str(args.steps), str(lr), f"{tmp}/full-{lr}"])
            rows.append((f"full fine-tuning (lr {lr:g})", full[lr]))
        best = max(full, key=lambda lr: (full[lr]["after"].get("accuracy", 0), -full[lr]["after"]["loss"]))
        for r in args.ranks:
            res = _child(["extract", f"{tmp}/full-{best}/model", str(r), f"{tmp}/extract-{r}"])
            rows.append((f"extracted from full (lr {best:g}) at r={r}", res))
    before = lora["before"]
    lines = [
        f"Before training: {'' if 'accuracy' not in before else f'accuracy {_pct(before)}, '}eval loss "
        f"{before['loss']:.4f}.\n",
        "| run | accuracy | eval loss | trainable / stored numbers | train (or extract) time, s | peak RSS, GB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, res in rows:
        extra = f" (‖ΔW−BA‖/‖ΔW‖ ≤ {res['error']:.2f})" if "error" in res else ""
        lines.append(
            f"| {name}{extra} | {_pct(res['after'])} | {res['after']['loss']:.4f} | {res['trainable']:,} | "
            f"{res['seconds']:.0f} | {res['rss']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        _write_docs(args, table)


def _write_docs(args, table: str) -> None:
    import torch

    machine = f"seed 0, fp32, {os.cpu_count()} CPUs ({torch.backends.cpu.get_cpu_capability()})"
    cmd = " ".join(["python benchmarks/bench_full.py", *sys.argv[1:]])
    if args.train_file:
        title, key = "LoRA vs full fine-tuning on real chat data", "bench_full_chat"
        cmd = f"python benchmarks/chat_corpus.py --out /tmp/chat`, then `{cmd}"
        what = (
            f"the English dialogs of `chatterbot-corpus` ({_lines(args.train_file)} train and "
            f"{_lines(args.eval_file)} held-out conversations, every tenth to eval), `lorakit train`'s defaults "
            "(batch 8, warmup 4, cosine; loss on the assistant turns)"
        )
        measure = (
            "The measure is the held-out eval loss (no exact-match accuracy: replies are open-ended). Extraction: "
            "`lorakit.extract` of the full fine-tune with the lowest eval loss"
        )
    else:
        title = "LoRA vs full fine-tuning on the built-in task, and LoRA extracted from the full fine-tune"
        key = "bench_full"
        what = "built-in `dates` task, `lorakit train`'s defaults (batch 8, warmup 4, cosine)"
        measure = (
            "Accuracy: exact match of greedy answers on 100 held-out examples. Extraction: `lorakit.extract` of "
            "the full fine-tune with the best accuracy"
        )
    section = (
        f"## {title}\n\n- command: `{cmd}`\n- setup: SmolLM2-135M-Instruct, {what}, {args.steps} steps, "
        f"{machine}; the same training loop for both, AdamW. {measure}, every changed weight (embedding "
        "included) at most rank r, norms copied; its time includes reading both checkpoints.\n\n" + table
    )
    docs = Path(__file__).parent.parent / "docs" / "benchmarks.md"
    write_docs(docs, section, f"<!-- {key}:start -->", f"<!-- {key}:end -->")


def _lines(path: str) -> int:
    return sum(1 for line in Path(path).read_text().splitlines() if line.strip())


if __name__ == "__main__":
    main()
