"""QLoRA at scale: random-weight checkpoints of real shapes (135M default, 1.7B, 7B), measured against PEFT +
bitsandbytes on this machine. Cost only, never quality: the weights are random.

    python benchmarks/bench_scale.py checkpoints              # write the 1.7B and 7B checkpoints once (cache)
    python benchmarks/bench_scale.py load --model 7b          # load time and peak RSS: lorakit NF4 vs bnb
    python benchmarks/bench_scale.py decode --model 7b        # greedy decode tokens/s: NF4 vs bnb vs bf16
    python benchmarks/bench_scale.py train --model 1.7b       # one training step: `lorakit bench` at 1x256
    python benchmarks/bench_scale.py report                   # docs/scale.md: tables and the cost-curve plot

Each command appends its results to benchmarks/results/scale.jsonl (one JSON object a line, with the CPU's
capability and the command), and `report` builds docs/scale.md from the newest result of each kind. Every
variant runs in its own process; variants alternate within each round.
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

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "scale.jsonl"
DOC = ROOT / "docs" / "scale.md"
PLOT = ROOT / "docs" / "scale.png"
SHAPES = {"135m": None, "1.7b": "smollm2-1.7b", "7b": "llama2-7b"}
DECODE_VARIANTS = ["lorakit-nf4", "bnb", "bf16"]
EXTRA_DECODE_VARIANTS = ["lorakit-nf4-fp32"]
"""lorakit-nf4-fp32: lorakit's NF4 decoding through the exact fp32 route (LORAKIT_GEMV=fp32), not the int8 one."""


def model_path(size: str) -> str | None:
    """The folder of the model of `size` (None: lorakit's default model); random checkpoints are written once."""
    if SHAPES[size] is None:
        return None
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from random_checkpoint import checkpoint

    return str(checkpoint(SHAPES[size]))


def machine() -> dict:
    import torch

    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "load_before": os.getloadavg()[0],
    }


def record(kind: str, payload: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(sys.argv)
    entry = {"kind": kind, "time": time.strftime("%Y-%m-%d %H:%M"), "command": command, **payload}
    with open(RESULTS, "a") as f:
        f.write(json.dumps(entry) + "\n")


def _worker(args: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "worker", *args], capture_output=True, text=True, env={**os.environ}
    )
    if out.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------------------
# Workers: one variant, one process
# --------------------------------------------------------------------------------------------------------------


def _load(variant: str, path: str | None, dtype):
    import torch

    import lorakit
    from lorakit.models import resolve_model_dir

    if variant in ("lorakit-nf4", "lorakit-nf4-fp32"):
        from lorakit.quant import native

        native.set_gemv_int8(variant == "lorakit-nf4")
        return lorakit.load_quantized(path, dtype=dtype)[0]
    if variant == "bnb":
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        cfg = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        extra = {} if dtype == torch.float32 else {"dtype": dtype}
        return AutoModelForCausalLM.from_pretrained(
            resolve_model_dir(path), quantization_config=cfg, device_map={"": "cpu"}, **extra
        )
    return lorakit.load_model(path, dtype=dtype)[0]


def worker(ns: argparse.Namespace) -> None:
    import torch

    from lorakit.bench_worker import hwm_gb, peak_rss_gb, reset_peak_rss, rss_now_gb

    torch.set_num_threads(ns.threads)
    dtype = getattr(torch, ns.dtype)
    start = time.perf_counter()
    model = _load(ns.variant, ns.path or None, dtype).eval()
    load_s = time.perf_counter() - start
    result = {
        "variant": ns.variant,
        "load_s": load_s,
        "load_peak_gb": peak_rss_gb(),
        "rss_after_load_gb": rss_now_gb(),
    }
    if ns.tokens:
        reset_peak_rss()
        ids = torch.randint(
            0, model.config.vocab_size, (1, ns.prompt), generator=torch.Generator().manual_seed(0)
        )
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            prefill = time.perf_counter() - t0
            past, nxt, steps = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), []
            for _ in range(ns.tokens):
                t0 = time.perf_counter()
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                steps.append(time.perf_counter() - t0)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        result.update(
            prefill_s=prefill,
            prefill_tok_s=ns.prompt / prefill,
            token_s=statistics.median(steps),
            decode_tok_s=1 / statistics.median(steps),
            decode_peak_gb=hwm_gb(),
        )
    print(json.dumps(result))


# --------------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------------


def cmd_checkpoints(ns: argparse.Namespace) -> None:
    for size in ("1.7b", "7b"):
        print(size, model_path(size))


def _rounds(ns: argparse.Namespace, variants: list[str], extra: list[str]) -> list[dict]:
    path = model_path(ns.model) or ""
    results = []
    for i in range(ns.rounds):
        order = variants[i % len(variants) :] + variants[: i % len(variants)]
        for v in order:
            r = _worker(
                ["--variant", v, "--path", path, "--dtype", ns.dtype, "--threads", str(ns.threads), *extra]
            )
            r["round"] = i
            results.append(r)
            print(json.dumps(r), flush=True)
    return results


def _median_by_variant(results: list[dict], keys: list[str]) -> dict:
    out = {}
    for v in dict.fromkeys(r["variant"] for r in results):
        rows = [r for r in results if r["variant"] == v]
        out[v] = {k: statistics.median(r[k] for r in rows) for k in keys if k in rows[0]}
    return out


def cmd_load(ns: argparse.Namespace) -> None:
    info = machine()
    results = _rounds(ns, ["lorakit-nf4", "bnb"], ["--tokens", "0"])
    summary = _median_by_variant(results, ["load_s", "load_peak_gb", "rss_after_load_gb"])
    record(
        "load",
        {"model": ns.model, "dtype": ns.dtype, "machine": info, "rounds": ns.rounds, "summary": summary},
    )
    print(json.dumps(summary, indent=1))


def cmd_decode(ns: argparse.Namespace) -> None:
    info = machine()
    extra = ["--tokens", str(ns.tokens), "--prompt", str(ns.prompt)]
    results = _rounds(ns, ns.variants, extra)
    keys = ["decode_tok_s", "token_s", "prefill_tok_s", "decode_peak_gb", "load_s", "load_peak_gb"]
    summary = _median_by_variant(results, keys)
    record(
        "decode",
        {
            "model": ns.model,
            "dtype": ns.dtype,
            "tokens": ns.tokens,
            "prompt": ns.prompt,
            "machine": info,
            "rounds": ns.rounds,
            "summary": summary,
        },
    )
    print(json.dumps(summary, indent=1))


def cmd_train(ns: argparse.Namespace) -> None:
    info = machine()
    path = model_path(ns.model)
    raw = RESULTS.parent / f"train-{ns.model}-{ns.dtype}{'-gc' if ns.grad_checkpointing else ''}.json"
    cmd = [
        sys.executable, "-m", "lorakit.bench", "--variants", *ns.variants, "--batch", str(ns.batch), "--seq",
        str(ns.seq), "--rounds", str(ns.rounds), "--steps", str(ns.steps), "--dtype", ns.dtype, "--json", str(raw),
    ]  # fmt: skip
    if path:
        cmd += ["--model", path]
    if ns.grad_checkpointing:
        cmd.append("--grad-checkpointing")
    subprocess.run(cmd, check=True)
    rounds = json.loads(raw.read_text())["rounds"]
    summary = {
        v: {
            "step_s": statistics.median(r[v]["step_s"] for r in rounds),
            "peak_rss_gb": statistics.median(r[v]["peak_rss_gb"] for r in rounds),
            "trainable": rounds[0][v]["trainable"],
        }
        for v in ns.variants
    }
    record(
        "train",
        {
            "model": ns.model,
            "dtype": ns.dtype,
            "batch": ns.batch,
            "seq": ns.seq,
            "grad_checkpointing": ns.grad_checkpointing,
            "machine": info,
            "rounds": ns.rounds,
            "summary": summary,
        },
    )
    print(json.dumps(summary, indent=1))


# --------------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------------

PARAMS = {"135m": 0.135, "1.7b": 1.81, "7b": 6.87}  # billions, with SmolLM2's 49,152-token vocabulary


def _newest(entries: list[dict], **match) -> dict | None:
    found = [e for e in entries if all(e.get(k) == v for k, v in match.items())]
    return found[-1] if found else None


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "–"


def cmd_report(ns: argparse.Namespace) -> None:
    entries = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    for e in entries:  # results recorded before the command carried its interpreter
        e["command"] = e["command"] if e["command"].startswith("python") else "python " + e["command"]
    lines = []
    train = [e for e in entries if e["kind"] == "train"]
    keyset = list(dict.fromkeys((e["model"], e["dtype"], e["grad_checkpointing"]) for e in train))
    lines += [
        "| model | compute | grad. ckpt | lorakit QLoRA step, s | PEFT+bnb QLoRA step, s | lorakit LoRA step, s "
        "| QLoRA / PEFT+bnb time | QLoRA / PEFT+bnb RSS | QLoRA / LoRA time | lorakit QLoRA peak RSS, GB "
        "| PEFT+bnb peak RSS, GB | LoRA peak RSS, GB | CPU | command |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for model, dtype, gc in keyset:
        e = _newest(train, model=model, dtype=dtype, grad_checkpointing=gc)
        s = e["summary"]
        q, b, f = s.get("lorakit-nf4", {}), s.get("peft-bnb", {}), s.get("lorakit", {})

        def fmt(d, k, digits=2):
            return f"{d[k]:.{digits}f}" if k in d else "–"

        lines.append(
            f"| {model} | {dtype} | {'yes' if gc else 'no'} | {fmt(q, 'step_s')} | {fmt(b, 'step_s')} "
            f"| {fmt(f, 'step_s')} | {_ratio(q.get('step_s'), b.get('step_s'))} "
            f"| {_ratio(q.get('peak_rss_gb'), b.get('peak_rss_gb'))} | {_ratio(q.get('step_s'), f.get('step_s'))} "
            f"| {fmt(q, 'peak_rss_gb', 3)} | {fmt(b, 'peak_rss_gb', 3)} | {fmt(f, 'peak_rss_gb', 3)} "
            f"| {e['machine']['cpu_capability']} | `{e['command']}` |"
        )
    decode = [e for e in entries if e["kind"] == "decode"]
    dlines = [
        "| model | compute | lorakit NF4, tok/s | bnb NF4, tok/s | dense, tok/s | NF4 / bnb | NF4 / dense "
        "| prefill tok/s (NF4, bnb, dense) | CPU | command |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for model, dtype in dict.fromkeys((e["model"], e["dtype"]) for e in decode):
        e = _newest(decode, model=model, dtype=dtype)
        s = e["summary"]
        q, b, d = (s.get(v, {}) for v in DECODE_VARIANTS)
        pre = ", ".join(f"{x['prefill_tok_s']:.1f}" if x else "–" for x in (q, b, d))
        dlines.append(
            f"| {model} | {dtype} | {q.get('decode_tok_s', 0):.2f} | {b.get('decode_tok_s', 0):.2f} "
            f"| {d.get('decode_tok_s', 0):.2f} | {_ratio(q.get('decode_tok_s'), b.get('decode_tok_s'))} "
            f"| {_ratio(q.get('decode_tok_s'), d.get('decode_tok_s'))} | {pre} | {e['machine']['cpu_capability']} "
            f"| `{e['command']}` |"
        )
    llines = [
        "| model | dtype | load, s: lorakit NF4 / bnb NF4 / dense | peak RSS in load, GB: lorakit NF4 / bnb NF4 "
        "/ dense | command |",
        "|---|---|---|---|---|",
    ]
    loads = [e for e in entries if e["kind"] in ("decode", "load")]  # decode workers time their load too
    for model, dtype in dict.fromkeys((e["model"], e["dtype"]) for e in loads):
        e = _newest(loads, model=model, dtype=dtype)
        s = e["summary"]
        secs = " / ".join(f"{s[v]['load_s']:.1f}" if v in s else "–" for v in DECODE_VARIANTS)
        peaks = " / ".join(f"{s[v]['load_peak_gb']:.2f}" if v in s else "–" for v in DECODE_VARIANTS)
        llines.append(f"| {model} | {dtype} | {secs} | {peaks} | `{e['command']}` |")
    _plot(train)
    text = DOC.read_text() if DOC.exists() else ""
    for tag, body in (("train", lines), ("decode", dlines), ("load", llines)):
        text = _replace(text, tag, "\n".join(body))
    DOC.write_text(text)
    print(f"wrote {DOC} and {PLOT}")


def _replace(text: str, tag: str, body: str) -> str:
    begin, end = f"<!-- scale:{tag} -->", f"<!-- /scale:{tag} -->"
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        return text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    return text + f"\n{block}\n"


def _plot(train: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = {"lorakit-nf4": "lorakit QLoRA", "peft-bnb": "PEFT + bnb QLoRA", "lorakit": "lorakit LoRA"}
    for dtype, gc, style in (("bfloat16", True, "-"), ("bfloat16", False, "--"), ("float32", False, ":")):
        for v, label in series.items():
            xs, ts, ms = [], [], []
            for model in PARAMS:
                e = _newest(train, model=model, dtype=dtype, grad_checkpointing=gc)
                if e and v in e["summary"]:
                    xs.append(PARAMS[model])
                    ts.append(e["summary"][v]["step_s"])
                    ms.append(e["summary"][v]["peak_rss_gb"])
            if xs:
                name = f"{label}, {dtype}{', ckpt' if gc else ''}"
                marker = "o" if not gc else "s"
                color = {"lorakit-nf4": "C0", "peft-bnb": "C1", "lorakit": "C2"}[v]  # one colour a variant
                ax_t.plot(xs, ts, style, marker=marker, color=color, label=name)
                ax_m.plot(xs, ms, style, marker=marker, color=color, label=name)
    for ax, title in ((ax_t, "step time at batch 1×256, s"), (ax_m, "peak RSS, GB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(list(PARAMS.values()), [f"{v:g}" for v in PARAMS.values()])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("parameters, billions")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_m.axhline(24, color="grey", lw=0.8)
    ax_m.text(0.14, 20, "this machine's 24 GB", fontsize=8, color="grey")
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("checkpoints")
    for name in ("load", "decode", "train"):
        s = sub.add_parser(name)
        s.add_argument("--model", choices=list(SHAPES), default="1.7b")
        s.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
        s.add_argument("--rounds", type=int, default=2)
        s.add_argument("--threads", type=int, default=2)
        if name == "decode":
            s.add_argument("--tokens", type=int, default=16)
            s.add_argument("--prompt", type=int, default=32)
            s.add_argument(
                "--variants", nargs="+", default=DECODE_VARIANTS, choices=DECODE_VARIANTS + EXTRA_DECODE_VARIANTS
            )
        if name == "train":
            s.add_argument("--variants", nargs="+", default=["lorakit-nf4", "peft-bnb", "lorakit"])
            s.add_argument("--batch", type=int, default=1)
            s.add_argument("--seq", type=int, default=256)
            s.add_argument("--steps", type=int, default=2)
            s.add_argument("--grad-checkpointing", action="store_true")
    sub.add_parser("report")
    w = sub.add_parser("worker")
    w.add_argument("--variant", required=True)
    w.add_argument("--path", default="")
    w.add_argument("--dtype", default="bfloat16")
    w.add_argument("--threads", type=int, default=2)
    w.add_argument("--tokens", type=int, default=0)
    w.add_argument("--prompt", type=int, default=32)
    ns = p.parse_args()
    {
        "checkpoints": cmd_checkpoints,
        "load": cmd_load,
        "decode": cmd_decode,
        "train": cmd_train,
        "report": cmd_report,
        "worker": worker,
    }[ns.cmd](ns)


if __name__ == "__main__":
    main()
