"""EVA's init (`lorakit.inject_eva`, `lorakit train --lora.init eva`) against PEFT's, and EVA against the default
init in training.

1. Init: lorakit's `eva_components` and PEFT's `get_eva_state_dict` on the same batches (the first 100 training
   micro-batches of the built-in task, 8 examples each, as `lorakit train` feeds them), SmolLM2-135M-Instruct in
   fp32, r=16 on every linear layer, PEFT's default EVA settings. Each run is its own process, lorakit's and PEFT's
   interleaved, `--repeats` times; the time is that of the call alone (the model is loaded before). Reports the
   median time of each and the ratio, whether both gave every module the same rank, and the smallest |cosine|
   between their first 4 components of any module.
2. Training: `lorakit train` twice, with the default init and with `--lora.init eva`, otherwise the same (seed,
   data, schedule, steps), measuring eval loss every `--eval-every` steps. With `--train-file`/`--eval-file` on
   that data (the chat set: `python benchmarks/chat_corpus.py --out /tmp/chat`). Writes the curves to
   docs/images/eva_curves.png.

    .venv/bin/python benchmarks/bench_eva.py [--part init|train|both] [--repeats 2] [--steps 100] [--write-docs]

The machine should be idle (`uptime`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_step import write_docs  # noqa: E402

ROOT = Path(__file__).parent.parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def init_child(tool: str, out: Path) -> None:
    """One EVA init in this process; writes out/result.json and out/components.safetensors."""
    import torch
    from safetensors.torch import save_file

    import lorakit
    from lorakit.data.tokenize import encode_dataset
    from lorakit.train.config import RunConfig
    from lorakit.train.run import load_examples
    from lorakit.train.schedule import init_batches

    torch.manual_seed(0)
    model, tok = lorakit.load_model()
    cfg = RunConfig()
    train, _, _ = load_examples(cfg)
    d = cfg.data
    rows, _ = encode_dataset(tok, train, max_len=d.max_len, chat=d.chat, train_on_all=d.train_on_all)
    batches = list(init_batches(rows, cfg, tok.pad_token_id))
    if tool == "lorakit":
        t0 = time.perf_counter()
        res = lorakit.eva_components(model, cfg.lora.replace(init="eva"), batches, progress=False)
        seconds = time.perf_counter() - t0
        ranks, comps = res.ranks, res.components
    else:
        import contextlib
        import io

        from peft import LoraConfig as PeftConfig
        from peft.tuners.lora.config import EvaConfig
        from peft.tuners.lora.eva import get_eva_state_dict

        config = PeftConfig(
            r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights="eva", eva_config=EvaConfig()
        )
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # PEFT prints a line for each batch a layer skips
            comps = get_eva_state_dict(model, batches, config, show_progress_bar=False)
        seconds = time.perf_counter() - t0
        ranks = {k: v.shape[0] for k, v in comps.items()}
    save_file({k: v[:4].contiguous() for k, v in comps.items() if v.shape[0]}, str(out / "components.safetensors"))
    (out / "result.json").write_text(json.dumps({"seconds": seconds, "ranks": ranks}))


def _child(args: list[str]) -> dict:
    print(" ".join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, __file__, "--child", *args], check=True, stdout=subprocess.DEVNULL)
    return json.loads((Path(args[-1]) / "result.json").read_text())


def run_init(repeats: int) -> dict:
    from safetensors.torch import load_file

    times: dict[str, list[float]] = {"lorakit": [], "peft": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            for tool in ("lorakit", "peft") if i % 2 == 0 else ("peft", "lorakit"):
                out = Path(tmp) / f"{tool}-{i}"
                out.mkdir()
                res = _child(["init", tool, str(out)])
                times[tool].append(res["seconds"])
                if i == 0:
                    res["components"] = load_file(str(out / "components.safetensors"))
                    if tool == "lorakit":
                        ours = res
                    else:
                        theirs = res
    differ = [m for m in ours["ranks"] if ours["ranks"][m] != theirs["ranks"].get(m, 0)]
    cosines = [
        float(c)
        for m, a in ours["components"].items()
        if m in theirs["components"]
        for c in (a[:4] * theirs["components"][m][: a.shape[0]][:4]).sum(1).abs()
        if a.shape[0] and theirs["components"][m].shape[0]
    ]
    return {
        "lorakit": statistics.median(times["lorakit"]),
        "peft": statistics.median(times["peft"]),
        "lorakit_all": times["lorakit"],
        "peft_all": times["peft"],
        "modules": len(ours["ranks"]),
        "rank_differ": len(differ),
        "min_cos": min(cosines),
        "ranks": sorted(ours["ranks"].values()),
    }


def run_train(steps: int, every: int, data: list[str]) -> dict:
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for init in ("default", "eva"):
            out = Path(tmp) / init
            cmd = [
                str(Path(sys.executable).parent / "lorakit"),
                "train",
                "--train.steps", str(steps),
                "--train.eval_every", str(every),
                "--train.save_every", "0",
                "--train.out_dir", str(out),
                "--lora.init", init,
                *data,
            ]  # fmt: skip
            print(" ".join(cmd), file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            summary = json.loads((out / "summary.json").read_text())
            curve = [
                (r["step"], r["eval_loss"])
                for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if "eval_loss" in r
            ]
            runs[init] = {"summary": summary, "curve": curve, "wall": wall}
    return runs


def _plot(runs: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for init, label in (("default", "default init"), ("eva", "EVA init")):
        steps, losses = zip(*runs[init]["curve"], strict=True)
        ax.plot(steps, losses, marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["init", "train", "both"], default="both")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--train-file", help="JSONL training data instead of the built-in task (with --eval-file)")
    p.add_argument("--eval-file")
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        init_child(args.child[1], Path(args.child[2]))
        return
    import torch

    machine = f"fp32, {os.cpu_count()} CPUs ({torch.backends.cpu.get_cpu_capability()})"
    sections = []
    if args.part in ("init", "both"):
        r = run_init(args.repeats)
        lines = [
            "| init | time, s (median) | runs, s | time / lorakit's |",
            "|---|---:|---:|---:|",
            f"| lorakit `eva_components` | {r['lorakit']:.1f} | {', '.join(f'{t:.1f}' for t in r['lorakit_all'])} "
            "| 1.00 |",
            f"| PEFT `get_eva_state_dict` | {r['peft']:.1f} | {', '.join(f'{t:.1f}' for t in r['peft_all'])} | "
            f"{r['peft'] / r['lorakit']:.2f} |",
            "",
            f"Agreement: {r['modules'] - r['rank_differ']} of {r['modules']} modules got the same rank from both "
            f"(ranks {r['ranks'][0]} to {r['ranks'][-1]}); the smallest |cosine| between their first 4 components "
            f"of any module: {r['min_cos']:.6f}.",
        ]
        table = "\n".join(lines)
        print(table)
        cmd = f"python benchmarks/bench_eva.py --part init --repeats {args.repeats}"
        sections.append(
            (
                "bench_eva_init",
                "## EVA init: lorakit against PEFT\n\n"
                f"- command: `{cmd}`\n- setup: SmolLM2-135M-Instruct, {machine}; the first 100 training batches "
                "of the built-in task (8 examples each, loss on the answers, as `lorakit train` feeds them), r=16 "
                "on the 7 linear kinds of every layer, PEFT's default EVA settings (rho 2, tau 0.99, label mask); "
                "one process per run, lorakit's and PEFT's interleaved; the time of the call alone.\n\n" + table,
            )
        )
    if args.part in ("train", "both"):
        data = []
        if args.train_file:
            data = ["--data.train_file", args.train_file, "--data.eval_file", args.eval_file, "--eval.limit", "0"]
        runs = run_train(args.steps, args.eval_every, data)
        lines = ["| init | " + " | ".join(f"step {s}" for s, _ in runs["default"]["curve"]) + " | EVA's own time, s |"]
        lines.append("|---|" + "---:|" * (len(runs["default"]["curve"]) + 1))
        for init in ("default", "eva"):
            eva = runs[init]["summary"].get("eva") or {}
            own = f"{eva['seconds']:.0f} ({eva['batches']} batches)" if eva else "–"
            lines.append(f"| {init} | " + " | ".join(f"{v:.4f}" for _, v in runs[init]["curve"]) + f" | {own} |")
        table = "\n".join(lines)
        print(table)
        what = "the chatterbot-corpus chat set" if args.train_file else "the built-in `dates` task"
        image = ROOT / "docs" / "images" / ("eva_curves_chat.png" if args.train_file else "eva_curves.png")
        _plot(runs, image, f"SmolLM2-135M, {what}")
        cmd = f"python benchmarks/bench_eva.py --part train --steps {args.steps} --eval-every {args.eval_every}"
        if args.train_file:
            cmd = (
                "python benchmarks/chat_corpus.py --out /tmp/chat`, then `"
                + cmd
                + " --train-file /tmp/chat/train.jsonl --eval-file /tmp/chat/eval.jsonl"
            )
        sections.append(
            (
                "bench_eva_train_chat" if args.train_file else "bench_eva_train",
                f"## EVA against the default init in training ({what})\n\n"
                f"- command: `{cmd}`\n- setup: SmolLM2-135M-Instruct, {machine}; `lorakit train`'s defaults "
                f"(r=16, alpha 32, all-linear, lr 2e-3, batch 8, cosine), {args.steps} steps, seed 0, the same "
                "for both but `--lora.init`. The eval loss is on the held-out split.\n\n"
                + table
                + f"\n\n![eval loss, default vs EVA](images/{image.name})",
            )
        )
    if args.write_docs:
        for key, section in sections:
            write_docs(ROOT / "docs" / "benchmarks.md", section, f"<!-- {key}:start -->", f"<!-- {key}:end -->")


if __name__ == "__main__":
    main()
