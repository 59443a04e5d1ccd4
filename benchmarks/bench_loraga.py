"""LoRA-GA's init (`lorakit.inject_loraga`, `lorakit train --lora.init lora_ga`) against PEFT's, and LoRA-GA against
the default init in training.

1. Init: lorakit's `inject_loraga` and PEFT's `preprocess_loraga` + `get_peft_model` on the first 8 training
   micro-batches of the built-in task (8 examples each, padded, as `lorakit train` feeds them; PEFT's train step
   runs the model's own loss and backward on each), SmolLM2-135M-Instruct in fp32, r=16 on every linear layer, the
   default direction and scale. Each run is its own process, lorakit's and PEFT's interleaved, `--repeats` times.
   Reports the time of the init alone (the model is loaded before), the process's peak RSS, and how far apart the
   results are: the gradients, and A and B up to each singular vector's sign (LAPACK's choice), relative to
   their largest entry, worst module. For that comparison PEFT's `torch.svd_lowrank` draws from the same seeded
   generator as lorakit's (the same operations as torch's: tests/test_loraga.py).
2. Training: `lorakit train` with the default init and with `--lora.init lora_ga`, otherwise the same (seed, data,
   schedule, steps), eval loss every `--eval-every` steps; accuracy before and after (bench_corda's `run_train`).

    .venv/bin/python benchmarks/bench_loraga.py [--part init|train|both] [--repeats 2] [--steps 40] [--lr 2e-4]

The machine should be idle (`uptime`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_corda import run_train

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCHES = 8


def init_child(tool: str, out: Path) -> None:
    """One LoRA-GA init in this process; writes out/result.json and out/factors.safetensors."""
    import torch
    from safetensors.torch import save_file

    import lorakit
    from lorakit.data.tokenize import encode_dataset
    from lorakit.train.config import RunConfig
    from lorakit.train.run import load_examples
    from lorakit.train.schedule import init_batches
    from lorakit.variants.loraga import svd_lowrank

    torch.manual_seed(0)
    model, tok = lorakit.load_model()
    cfg = RunConfig(lora=lorakit.LoraConfig(r=16, alpha=32, targets=TARGETS, init="lora_ga", lora_ga_batches=BATCHES))
    train, _, _ = load_examples(cfg)
    d = cfg.data
    rows, _ = encode_dataset(tok, train, max_len=d.max_len, chat=d.chat, train_on_all=d.train_on_all)
    batches = list(init_batches(rows, cfg, tok.pad_token_id))
    factors = {}
    if tool == "lorakit":
        t0 = time.perf_counter()
        res = lorakit.inject_loraga(model, cfg.lora, batches, seed=0, progress=False)
        seconds = time.perf_counter() - t0
        for name, layer in model.named_modules():
            if isinstance(layer, lorakit.LoraLayer):
                a = layer.adapters["default"]
                factors[f"{name}.A"], factors[f"{name}.B"] = a.lora_A.detach(), a.lora_B.detach()
                factors[f"{name}.G"] = res.gradients[name]
    else:
        import peft
        from peft.tuners.lora import loraga

        config = peft.LoraConfig(
            r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights="lora_ga",
            lora_ga_config=peft.tuners.lora.config.LoraGAConfig(),
        )  # fmt: skip
        g = torch.Generator().manual_seed(0)
        torch.svd_lowrank = lambda a, q, niter: svd_lowrank(a, q, niter, g)  # the same draws as lorakit's
        t0 = time.perf_counter()
        loraga.preprocess_loraga(model, config, lambda: [model(**b).loss.backward() for b in batches])
        grads = {n: m._peft_loraga_grad.clone() for n, m in model.named_modules() if hasattr(m, "_peft_loraga_grad")}
        pmodel = peft.get_peft_model(model, config)
        seconds = time.perf_counter() - t0
        for name, layer in pmodel.base_model.model.named_modules():
            if hasattr(layer, "lora_A") and "default" in getattr(layer, "lora_A", {}):
                factors[f"{name}.A"] = layer.lora_A["default"].weight.detach()
                factors[f"{name}.B"] = layer.lora_B["default"].weight.detach()
                factors[f"{name}.G"] = grads[name]
    save_file({k: v.contiguous() for k, v in factors.items()}, str(out / "factors.safetensors"))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    (out / "result.json").write_text(json.dumps({"seconds": seconds, "rss_gb": rss, "modules": len(factors) // 3}))


def _child(args: list[str]) -> dict:
    print(" ".join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, __file__, "--child", *args], check=True, stdout=subprocess.DEVNULL)
    return json.loads((Path(args[-1]) / "result.json").read_text())


def run_init(repeats: int) -> dict:
    import torch
    from safetensors.torch import load_file

    runs: dict[str, list[dict]] = {"lorakit": [], "peft": []}
    factors = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            for tool in ("lorakit", "peft") if i % 2 == 0 else ("peft", "lorakit"):
                out = Path(tmp) / f"{tool}-{i}"
                out.mkdir()
                runs[tool].append(_child(["init", tool, str(out)]))
                if i == 0:
                    factors[tool] = load_file(str(out / "factors.safetensors"))
    ours, theirs = factors["lorakit"], factors["peft"]
    grad, a_gap, b_gap, flips, vectors = [], [], [], 0, 0
    for key in ours:
        if not key.endswith(".A"):
            continue
        m = key[:-2]
        g1, g2 = ours[f"{m}.G"], theirs[f"{m}.G"]
        grad.append(float((g1 - g2).abs().max() / g2.abs().max()))
        a1, b1, a2, b2 = ours[f"{m}.A"], ours[f"{m}.B"], theirs[f"{m}.A"], theirs[f"{m}.B"]
        sa, sb = torch.sign((a1 * a2).sum(1, keepdim=True)), torch.sign((b1 * b2).sum(0, keepdim=True))
        flips += int((sa < 0).sum() + (sb < 0).sum())
        vectors += sa.numel() + sb.numel()
        a_gap.append(float((a1 * sa - a2).abs().max() / a2.abs().max()))
        b_gap.append(float((b1 * sb - b2).abs().max() / b2.abs().max()))
    med = {t: statistics.median(r["seconds"] for r in runs[t]) for t in runs}
    return {
        "runs": runs,
        "median": med,
        "modules": len(grad),
        "grad_worst": max(grad),
        "a_worst": max(a_gap),
        "b_worst": max(b_gap),
        "b_median": statistics.median(b_gap),
        "flips": flips,
        "vectors": vectors,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["init", "train", "both"], default="both")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--inits", default="default,lora_ga", help="the inits to train with, comma-separated")
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
        med = r["median"]
        print("| init | time, s (median) | runs, s | time / lorakit's | peak RSS, GB |")
        print("|---|---:|---:|---:|---:|")
        for tool, label in (("lorakit", "lorakit `inject_loraga`"), ("peft", "PEFT `preprocess_loraga` + `get_peft_model`")):
            runs = r["runs"][tool]
            times = ", ".join(f"{x['seconds']:.1f}" for x in runs)
            print(
                f"| {label} | {med[tool]:.1f} | {times} | {med[tool] / med['lorakit']:.2f} | "
                f"{max(x['rss_gb'] for x in runs):.2f} |"
            )
        print(
            f"\n{r['modules']} modules; worst module, relative to the largest entry: gradient {r['grad_worst']:.1e}, "
            f"A {r['a_worst']:.1e} and B {r['b_worst']:.1e} up to sign (median module's B {r['b_median']:.1e}); "
            f"{r['flips']} of {r['vectors']} singular vectors with the other sign"
        )
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
            if s.get("lora_ga"):
                print(f"\nLoRA-GA: {json.dumps(s['lora_ga'])}")


if __name__ == "__main__":
    main()
