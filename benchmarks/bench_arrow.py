"""Arrow on two real adapters: does routing each token to its best adapter serve two tasks without being told which
one a prompt is? Against each adapter alone, their static mean, and PEFT's Arrow on the same folders.

Task A is the built-in task (a date in words -> ISO); task B its reverse (ISO -> "Month D, YYYY"), generated here.
One LoRA adapter is trained on each with `lorakit train` at its defaults. Then each configuration answers both
tasks' 100 held-out prompts (greedy, exact match, as `lorakit train` scores):
- base; adapter A alone; adapter B alone; A and B at weight 0.5 each (a static mix);
- lorakit Arrow over {A, B} with top_k 1 and 2;
- PEFT's `create_arrow_model` over the same folders, top_k 1 (its prototypes by 15 power-iteration steps).

    .venv/bin/python benchmarks/bench_arrow.py --out /tmp/arrow            # data, training (two runs), eval
    .venv/bin/python benchmarks/bench_arrow.py --out /tmp/arrow --part eval
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import platform
import random
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

MONTHS = list(calendar.month_name)[1:]
INSTRUCTION_B = "Write this date as Month D, YYYY, answer with the date only: "


def reverse_example(rng: random.Random) -> dict:
    y, m = rng.randint(1900, 2099), rng.randint(1, 12)
    d = rng.randint(1, calendar.monthrange(y, m)[1])
    return {"prompt": f"{INSTRUCTION_B}{y:04d}-{m:02d}-{d:02d}", "completion": f"{MONTHS[m - 1]} {d}, {y}"}


def write_data(out: Path) -> None:
    rng = random.Random(1)
    eval_set, seen = [], set()
    while len(eval_set) < 100:
        ex = reverse_example(rng)
        if ex["prompt"] not in seen:
            seen.add(ex["prompt"])
            eval_set.append(ex)
    train = []
    while len(train) < 2000:
        ex = reverse_example(rng)
        if ex["prompt"] not in seen:
            train.append(ex)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("b_train", train), ("b_eval", eval_set)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def train(out: Path) -> None:
    lorakit = [sys.executable, "-m", "lorakit", "train"]
    runs = {
        "a": [],
        "b": ["--data.train_file", str(out / "b_train.jsonl"), "--data.eval_file", str(out / "b_eval.jsonl")],
    }
    for name, extra in runs.items():
        cmd = [*lorakit, *extra, "--train.out_dir", str(out / name)]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def evaluate(out: Path) -> None:
    import peft
    import torch
    from peft.tuners.lora.arrow import create_arrow_model
    from peft.tuners.lora.config import ArrowConfig

    import lorakit
    from lorakit.data.tasks import make_task
    from lorakit.train.evaluate import exact_match

    tasks = {
        "A": make_task("dates")[1],
        "B": [json.loads(line) for line in (out / "b_eval.jsonl").read_text().splitlines()],
    }
    model, tok = lorakit.load_model()
    lorakit.load_adapter(model, out / "a" / "adapter", "a")
    lorakit.load_adapter(model, out / "b" / "adapter", "b")

    def score(label: str, run=lambda: nullcontext(), m=None) -> dict:
        row = {"config": label}
        for task, examples in tasks.items():
            t0 = time.perf_counter()
            with run():
                acc, _ = exact_match(m if m is not None else model, tok, examples, merge=False)
            row[task] = acc
            row[f"{task}_s"] = time.perf_counter() - t0
        print(json.dumps(row), flush=True)
        return row

    rows = [score("base", lambda: lorakit.disabled(model))]
    for name in ("a", "b"):
        lorakit.set_active(model, name)
        rows.append(score(f"adapter {name.upper()} alone"))
    lorakit.set_active(model, {"a": 0.5, "b": 0.5})
    rows.append(score("A and B at 0.5 each"))
    for k in (1, 2):
        rows.append(score(f"lorakit Arrow, top_k {k}", lambda k=k: lorakit.arrow(model, ["a", "b"], top_k=k)))
    base, _ = lorakit.load_model()
    pm = create_arrow_model(base, [str(out / "a" / "adapter"), str(out / "b" / "adapter")], ArrowConfig(top_k=1, rng_seed=0))
    rows.append(score("PEFT Arrow, top_k 1", m=pm.eval()))
    print()
    print("| configuration | task A accuracy | task B accuracy | eval time A + B, s |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['A']:.1%} | {r['B']:.1%} | {r['A_s'] + r['B_s']:.1f} |")
    assert peft and torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/arrow"))
    ap.add_argument("--part", choices=("all", "data", "train", "eval"), default="all")
    a = ap.parse_args()
    import torch

    print(f"cpu: {platform.processor() or platform.machine()}, {torch.backends.cpu.get_cpu_capability()}, "
          f"{os.cpu_count()} cores; load {os.getloadavg()[0]:.2f}")
    if a.part in ("all", "data"):
        write_data(a.out)
    if a.part in ("all", "train"):
        train(a.out)
    if a.part in ("all", "eval"):
        evaluate(a.out)


if __name__ == "__main__":
    main()
