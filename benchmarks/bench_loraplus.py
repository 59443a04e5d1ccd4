"""LoRA+ vs LoRA at the same lr_A: steps to reach a target loss on a wide synthetic model.

The model: a frozen random two-layer MLP of width `--width` (y = W2·gelu(W1·x)), with rank-`--r` LoRA on both
layers. The teacher is the same MLP with a random rank-`--teacher-rank` change to each weight, so a rank-r LoRA
can fit it exactly. Both runs start from the same adapter initialisation (B = 0) and see the same batches; the
only difference is the learning rate of B: lr_A for LoRA, ratio · lr_A for LoRA+ (AdamW, constant lr).

    python benchmarks/bench_loraplus.py --out docs/loraplus.png --json docs/loraplus.json

With `--real`, instead: LoRA and LoRA+ on the built-in `dates` task with the default SmolLM2-135M model (same
seed, data and lr_A), printing the training loss every 5 steps and the eval loss at the end.

Prints a markdown table: for every lr_A, the step at which the training loss (a running mean over 10 steps)
first falls to each `--target` × its initial value, for LoRA and for LoRA+, and the final loss of each.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

import lorakit


class MLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width, bias=False)
        self.fc2 = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def teacher_weights(model: MLP, rank: int, scale: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in ("fc1", "fc2"):
        w = getattr(model, name).weight.detach()
        d, k = w.shape
        u = torch.randn(d, rank, generator=g) / math.sqrt(d)
        v = torch.randn(rank, k, generator=g) / math.sqrt(k)
        out[name] = w + scale * math.sqrt(d) * (u @ v)  # ‖ΔW‖ comparable to ‖W‖ · scale
    return out


def run(args: argparse.Namespace, lr: float, plus: bool) -> list[float]:
    torch.manual_seed(args.seed)
    model = MLP(args.width)
    target = teacher_weights(model, args.teacher_rank, args.scale, args.seed + 1)
    lorakit.inject(model, lorakit.LoraConfig(r=args.r, alpha=args.r, targets=["fc1", "fc2"]))
    if plus:
        opt = lorakit.loraplus_optimizer(model, lr=lr, ratio=args.ratio, weight_decay=0.0)
    else:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 2)
    losses = []
    for _ in range(args.steps):
        x = torch.randn(args.batch, args.width, generator=g)
        with torch.no_grad():
            y = F.linear(F.gelu(F.linear(x, target["fc1"])), target["fc2"])
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def steps_to(losses: list[float], target: float, window: int = 10) -> int | None:
    """First step (1-based) where the running mean over `window` steps is <= target × the initial loss."""
    goal = target * losses[0]
    for i in range(window, len(losses) + 1):
        if sum(losses[i - window : i]) / window <= goal:
            return i
    return None


def plot(results: dict, args: argparse.Namespace, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = sorted({r["lr"] for r in results["runs"]})
    fig, axes = plt.subplots(1, len(lrs), figsize=(3.2 * len(lrs), 3.4), sharey=True)
    for ax, lr in zip(axes, lrs, strict=True):
        for r in results["runs"]:
            if r["lr"] == lr:
                ax.plot([v / r["losses"][0] for v in r["losses"]], label=r["method"], lw=1)
        for t in args.target:
            ax.axhline(t, color="grey", ls=":", lw=1)
        ax.set_title(f"lr_A = {lr:g}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss / initial loss")
    axes[0].legend()
    fig.suptitle(f"LoRA vs LoRA+ (ratio {args.ratio:g}), width {args.width}, r={args.r}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def real(args: argparse.Namespace) -> None:
    """LoRA vs LoRA+ with `run_training` on the default model and the built-in task."""
    import tempfile

    from lorakit.train.config import load_config
    from lorakit.train.run import run_training

    curves = {}
    for lr in args.lrs:
        for method in ("lora", "loraplus"):
            out = tempfile.mkdtemp(prefix=f"loraplus-{method}-")
            overrides = ["--method", method, "--train.lr", str(lr), "--train.steps", str(args.steps)]
            overrides += [
                "--train.out_dir",
                out,
                "--train.threads",
                str(args.threads),
                "--train.save_every",
                "0",
            ]
            overrides += ["--data.max_len", "96", "--train.batch_size", "8", "--train.schedule", "constant"]
            overrides += ["--eval.limit", "0", "--data.n_eval", "32", "--train.warmup_steps", "0"]
            if method == "loraplus":
                overrides += ["--loraplus.ratio", str(args.ratio)]
            losses = []
            summary = run_training(
                load_config(None, overrides), callbacks=[lambda r, ls=losses: ls.append(r)]
            )
            train = [r["loss"] for r in losses if "loss" in r]
            curves[(lr, method)] = (train, summary["before"]["loss"], summary["after"]["loss"])
            print(
                f"lr_A={lr:g} {method}: eval loss {summary['before']['loss']:.4f} -> {summary['after']['loss']:.4f}"
            )
    steps = ", ".join(str(s) for s in range(5, args.steps + 1, 5))
    print(f"\n| lr_A | method | train loss at steps {steps} | eval loss before -> after |")
    print("|---|---|---|---|")
    for (lr, method), (train, before, after) in curves.items():
        pts = " ".join(f"{train[s - 1]:.3f}" for s in range(5, len(train) + 1, 5))
        print(f"| {lr:g} | {method} | {pts} | {before:.4f} -> {after:.4f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--teacher-rank", type=int, default=4)
    p.add_argument("--scale", type=float, default=0.5, help="size of the teacher's change relative to W")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3])
    p.add_argument("--ratio", type=float, default=16.0)
    p.add_argument(
        "--target",
        type=float,
        nargs="+",
        default=[0.5, 0.2],
        help="target losses, fractions of the initial loss",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="PNG of the loss curves")
    p.add_argument("--json", help="write all losses here")
    p.add_argument("--real", action="store_true", help="the built-in task on the default model instead")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.real:
        return real(args)
    results = {"args": vars(args), "runs": []}
    rows = []
    t0 = time.perf_counter()
    for lr in args.lrs:
        row = {"lr": lr}
        for plus in (False, True):  # same seed, same batches
            losses = run(args, lr, plus)
            name = "LoRA+" if plus else "LoRA"
            results["runs"].append({"method": name, "lr": lr, "losses": losses})
            row[name] = ([steps_to(losses, t) for t in args.target], losses[-1] / losses[0])
        rows.append(row)
        print(f"lr_A={lr:g} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    targets = ", ".join(f"{t:g}" for t in args.target)
    print(f"\nsteps until the loss (running mean of 10) is <= {targets} x initial; final loss / initial:\n")
    print("| lr_A | target | LoRA steps | LoRA+ steps | LoRA final | LoRA+ final |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        (s0, f0), (s1, f1) = row["LoRA"], row["LoRA+"]
        for t, a, b in zip(args.target, s0, s1, strict=True):
            print(
                f"| {row['lr']:g} | {t:g} | {a or 'not reached'} | {b or 'not reached'} | {f0:.3g} | {f1:.3g} |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)
    if args.out:
        plot(results, args, args.out)
        print(f"\nplot: {args.out}")


if __name__ == "__main__":
    main()
