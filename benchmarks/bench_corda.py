"""CorDA's init (`lorakit.inject_corda`, `lorakit train --lora.init corda`) against PEFT's, and CorDA against the
default init in training.

1. Init: lorakit's `inject_corda` on the first 32 training micro-batches of the built-in task (8 examples each,
   padded, as `lorakit train` feeds them) and PEFT's `preprocess_corda` + `get_peft_model` on the same 256 examples,
   one unpadded example per forward (as PEFT expects), SmolLM2-135M-Instruct in fp32, r=16 on every linear layer,
   mode ipm. Each run is its own process, lorakit's and PEFT's interleaved, `--repeats` times; the time is that of
   the init alone (the model is loaded before). Reports the median time of each, the ratio, and how far apart the
   results are: B·Bᵀ (the output directions and their weights) and B·A, each relative to its largest entry, worst
   module.
2. Training: `lorakit train` with the default init and with `--lora.init corda`, otherwise the same (seed, data,
   schedule, steps), eval loss every `--eval-every` steps; accuracy before and after.
3. Sensitivity (`--part sensitivity`, not in "both"): PEFT's own decomposition (`collect_eigens_for_layer`) of
   layers 0 and 1 from its covariance on the first 24 examples, and from that covariance perturbed by Gaussian
   noise of 1e-7 times its largest entry: how far B·A moves. This is the float32 floor for any two CorDA
   implementations that compute the covariance in a different order.

    .venv/bin/python benchmarks/bench_corda.py [--part init|train|both|sensitivity] [--repeats 2] [--steps 40]

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

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCHES = 32


def init_child(tool: str, out: Path) -> None:
    """One CorDA init in this process; writes out/result.json and out/factors.safetensors."""
    import torch
    from safetensors.torch import save_file

    import lorakit
    from lorakit.data.tokenize import encode_dataset
    from lorakit.train.config import RunConfig
    from lorakit.train.run import load_examples
    from lorakit.train.schedule import init_batches

    torch.manual_seed(0)
    model, tok = lorakit.load_model()
    cfg = RunConfig(lora=lorakit.LoraConfig(r=16, alpha=32, targets=TARGETS, init="corda", corda_batches=BATCHES))
    train, _, _ = load_examples(cfg)
    d = cfg.data
    rows, _ = encode_dataset(tok, train, max_len=d.max_len, chat=d.chat, train_on_all=d.train_on_all)
    batches = list(init_batches(rows, cfg, tok.pad_token_id))
    factors = {}
    if tool == "lorakit":
        t0 = time.perf_counter()
        lorakit.inject_corda(model, cfg.lora, batches, progress=False)
        seconds = time.perf_counter() - t0
        for name, layer in model.named_modules():
            if isinstance(layer, lorakit.LoraLayer):
                a = layer.adapters["default"]
                factors[f"{name}.A"], factors[f"{name}.B"] = a.lora_A.detach(), a.lora_B.detach()
    else:
        import peft
        from peft.tuners.lora.corda import preprocess_corda

        samples = [b["input_ids"][i][b["attention_mask"][i].bool()] for b in batches for i in range(len(b["input_ids"]))]
        config = peft.LoraConfig(
            r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights="corda",
            corda_config=peft.tuners.lora.config.CordaConfig(corda_method="ipm"),
        )  # fmt: skip
        t0 = time.perf_counter()
        with torch.no_grad():
            preprocess_corda(model, config, run_model=lambda: [model(s[None]) for s in samples])
        pmodel = peft.get_peft_model(model, config)
        seconds = time.perf_counter() - t0
        for name, layer in pmodel.base_model.model.named_modules():
            if hasattr(layer, "lora_A") and "default" in getattr(layer, "lora_A", {}):
                factors[f"{name}.A"] = layer.lora_A["default"].weight.detach()
                factors[f"{name}.B"] = layer.lora_B["default"].weight.detach()
    save_file({k: v.contiguous() for k, v in factors.items()}, str(out / "factors.safetensors"))
    (out / "result.json").write_text(json.dumps({"seconds": seconds, "modules": len(factors) // 2}))


def _child(args: list[str]) -> dict:
    print(" ".join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, __file__, "--child", *args], check=True, stdout=subprocess.DEVNULL)
    return json.loads((Path(args[-1]) / "result.json").read_text())


def run_init(repeats: int) -> dict:
    from safetensors.torch import load_file

    times: dict[str, list[float]] = {"lorakit": [], "peft": []}
    factors = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            for tool in ("lorakit", "peft") if i % 2 == 0 else ("peft", "lorakit"):
                out = Path(tmp) / f"{tool}-{i}"
                out.mkdir()
                times[tool].append(_child(["init", tool, str(out)])["seconds"])
                if i == 0:
                    factors[tool] = load_file(str(out / "factors.safetensors"))
    ours, theirs = factors["lorakit"], factors["peft"]
    bb, ba = [], []
    for key in ours:
        if not key.endswith(".A"):
            continue
        m = key[:-2]
        a1, b1, a2, b2 = ours[f"{m}.A"], ours[f"{m}.B"], theirs[f"{m}.A"], theirs[f"{m}.B"]
        p1, p2 = b1 @ b1.T, b2 @ b2.T
        bb.append(float((p1 - p2).abs().max() / p2.abs().max()))
        p1, p2 = b1 @ a1, b2 @ a2
        ba.append(float((p1 - p2).abs().max() / p2.abs().max()))
    return {
        "lorakit": statistics.median(times["lorakit"]),
        "peft": statistics.median(times["peft"]),
        "lorakit_all": times["lorakit"],
        "peft_all": times["peft"],
        "modules": len(bb),
        "bb_worst": max(bb),
        "ba_worst": max(ba),
        "ba_median": statistics.median(ba),
    }


def run_train(steps: int, every: int, inits: list[str], lr: str | None) -> dict:
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in inits:  # "default", "corda" or "corda:kpm"
            init, _, mode = spec.partition(":")
            out = Path(tmp) / spec.replace(":", "-")
            cmd = [
                str(Path(sys.executable).parent / "lorakit"), "train",
                "--train.steps", str(steps), "--train.eval_every", str(every), "--train.save_every", "0",
                "--train.out_dir", str(out), "--lora.init", init, *(["--train.lr", lr] if lr else []),
                *(["--lora.corda_mode", mode] if mode else []),
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
            runs[spec] = {"summary": summary, "curve": curve, "wall": wall}
    return runs


def run_sensitivity() -> list[tuple[str, float, float]]:
    import peft
    import torch
    from peft.tuners.lora import corda

    import lorakit
    from lorakit.data.tokenize import encode_dataset
    from lorakit.train.config import RunConfig
    from lorakit.train.run import load_examples
    from lorakit.train.schedule import init_batches

    model, tok = lorakit.load_model()
    cfg = RunConfig(lora=lorakit.LoraConfig(init="corda", corda_batches=3))
    train, _, _ = load_examples(cfg)
    rows, _ = encode_dataset(tok, train, max_len=cfg.data.max_len, chat=cfg.data.chat)
    samples = [
        b["input_ids"][i][b["attention_mask"][i].bool()]
        for b in init_batches(rows, cfg, tok.pad_token_id)
        for i in range(len(b["input_ids"]))
    ]
    config = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=TARGETS, layers_to_transform=[0, 1], init_lora_weights="corda",
        corda_config=peft.tuners.lora.config.CordaConfig(corda_method="ipm"),
    )  # fmt: skip
    with torch.no_grad():
        corda.calib_cov_distribution(model, config, lambda: [model(s[None]) for s in samples], None, None)
    g = torch.Generator().manual_seed(0)
    out = []
    for name, module in corda.target_modules(model, config):
        c = module.covariance_matrix
        products = []
        for noise in (0.0, 1e-7):
            e = torch.randn(c.shape, generator=g) * float(c.abs().max()) * noise
            module.covariance_matrix = c + (e + e.T) / 2
            eig = corda.collect_eigens_for_layer(module, config)
            u, sv, v = eig.U_WC[:, :8], eig.S_WC[:8] / 2.0, eig.V_WC[:, :8]  # scaling alpha/r = 2
            products.append((u * sv.sqrt()) @ (v.T * sv.sqrt()[:, None]))
        module.covariance_matrix = c
        out.append((name, float((products[0] - products[1]).abs().max()), float(products[0].abs().max())))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["init", "train", "both", "sensitivity"], default="both")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--inits", default="default,corda", help="the inits to train with, comma-separated; corda:kpm for the kpm mode")
    p.add_argument("--lr", help="--train.lr for every run (default: lorakit train's)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        init_child(args.child[1], Path(args.child[2]))
        return
    import torch

    print(f"# fp32, {os.cpu_count()} CPUs ({torch.backends.cpu.get_cpu_capability()})")
    if args.part in ("init", "both"):
        r = run_init(args.repeats)
        print("| init | time, s (median) | runs, s | time / lorakit's |")
        print("|---|---:|---:|---:|")
        print(f"| lorakit `inject_corda` | {r['lorakit']:.1f} | {', '.join(f'{t:.1f}' for t in r['lorakit_all'])} | 1.00 |")
        print(
            f"| PEFT `preprocess_corda` + `get_peft_model` | {r['peft']:.1f} | "
            f"{', '.join(f'{t:.1f}' for t in r['peft_all'])} | {r['peft'] / r['lorakit']:.2f} |"
        )
        print(
            f"\n{r['modules']} modules; worst module, relative to the largest entry: B·Bᵀ {r['bb_worst']:.1e}, "
            f"B·A {r['ba_worst']:.1e} (median module {r['ba_median']:.1e})"
        )
    if args.part == "sensitivity":
        rows = run_sensitivity()
        print("| module | max change of B·A | largest entry of B·A |\n|---|---:|---:|")
        for name, change, top in rows:
            print(f"| {name} | {change:.2e} | {top:.2f} |")
        worst = max(rows, key=lambda r: r[1] / r[2])
        print(f"\nworst relative change: {worst[1] / worst[2]:.1e} ({worst[0]})")
    if args.part in ("train", "both"):
        runs = run_train(args.steps, args.eval_every, args.inits.split(","), args.lr)
        first = next(iter(runs.values()))["curve"]
        print("\n| init | " + " | ".join(f"step {s}" for s, _ in first) + " | accuracy | wall, s |")
        print("|---|" + "---:|" * (len(first) + 2))
        for init, run in runs.items():
            s = run["summary"]
            print(
                f"| {init} | " + " | ".join(f"{v:.4f}" for _, v in run["curve"])
                + f" | {s['before']['accuracy']:.1%} → {s['after']['accuracy']:.1%} | {run['wall']:.0f} |"
            )
            if s.get("corda"):
                print(f"\nCorDA: {json.dumps(s['corda'])}")


if __name__ == "__main__":
    main()
