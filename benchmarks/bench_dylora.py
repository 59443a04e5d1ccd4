"""DyLoRA vs LoRA: test error at every rank b = 1..r_max after one training run (the loss-vs-rank plot).

A frozen linear layer W0 (d × d) learns W0 + ΔW* where ΔW* has rank r_max and singular values 2·q^i (a dominant
direction and a decaying tail, the shape LoRA assumes). Curves, each as test error relative to the base model's:

* DyLoRA (frozen / unfrozen), one run, evaluated with `lorakit.set_rank(model, b)`;
* LoRA of rank r_max, one run, truncated to its first b components (what `set_rank` would do to it);
* LoRA of rank r_max, one run, truncated by SVD of its ΔW to the best rank-b part (needs the SVD per layer);
* LoRA trained separately at each rank b (r_max runs: the search DyLoRA avoids);
* the best any rank-b update can do (Eckart–Young).

    python benchmarks/bench_dylora.py --out docs/dylora.png
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import lorakit
from lorakit.train.config import DyLoraSection, RunConfig, TrainSection
from lorakit.train.methods import Method
from lorakit.train.methods.dylora import DyLoraMethod


class Layer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def problem(args):
    torch.manual_seed(args.seed)
    net = Layer(args.d)
    g = torch.Generator().manual_seed(args.seed + 1)
    U, _ = torch.linalg.qr(torch.randn(args.d, args.r, generator=g))
    V, _ = torch.linalg.qr(torch.randn(args.d, args.r, generator=g))
    S = 2 * args.q ** torch.arange(args.r, dtype=torch.float32)
    return net, net.proj.weight.detach() + U @ torch.diag(S) @ V.T, S


def train(args, kind: str, mode: str = "frozen", r: int | None = None) -> nn.Module:
    r = r or args.r
    net, target, _ = problem(args)
    cfg = RunConfig(
        lora=lorakit.LoraConfig(r=r, alpha=r, targets=["proj"]),
        train=TrainSection(method=kind, seed=args.seed),
        dylora=DyLoraSection(mode=mode),
    )
    method = DyLoraMethod(cfg) if kind == "dylora" else Method(cfg)
    method.prepare(net, None)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 2)
    for step in range(args.steps):
        x = torch.randn(args.batch, args.d, generator=g)
        method.before_step(net, step)
        (net(x) - x @ target.T).pow(2).mean().backward()
        opt.step()
        method.after_step(net, step)
        opt.zero_grad()
    method.finish(net)
    return net.eval()


@torch.no_grad()
def errors(args, net, how: str) -> list[float]:
    _, target, _ = problem(args)
    x = torch.randn(4096, args.d, generator=torch.Generator().manual_seed(args.seed + 3))
    y = x @ target.T
    layer = net.proj
    base = (layer.base_layer(x) - y).pow(2).mean()
    a = layer.adapters["default"]
    out = []
    for b in range(1, args.r + 1):
        if how == "set_rank":
            lorakit.set_rank(net, b)
            pred = net(x)
        elif how == "first":
            pred = layer.base_layer(x) + (x @ a.lora_A[:b].T) @ a.lora_B[:, :b].T * a.scaling
        else:  # "svd": best rank-b part of the trained ΔW
            u, s, vh = torch.linalg.svd(lorakit.delta_weight(layer, a))
            pred = layer.base_layer(x) + x @ (u[:, :b] * s[:b] @ vh[:b]).T
        out.append(((pred - y).pow(2).mean() / base).item())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--q", type=float, default=0.25, help="singular values of the target change: 2·q^i")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="PNG of the loss-vs-rank plot")
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    _, _, S = problem(args)
    curves = {
        "DyLoRA frozen (one run)": errors(args, train(args, "dylora", "frozen"), "set_rank"),
        "DyLoRA unfrozen (one run)": errors(args, train(args, "dylora", "unfrozen"), "set_rank"),
    }
    lora = train(args, "lora")
    curves["LoRA r_max, first b components"] = errors(args, lora, "first")
    curves["LoRA r_max, SVD-truncated to b"] = errors(args, lora, "svd")
    curves["LoRA trained at each b (r_max runs)"] = [
        errors(args, train(args, "lora", r=b), "first")[b - 1]
        if b < args.r
        else errors(args, lora, "first")[-1]
        for b in range(1, args.r + 1)
    ]
    curves["best rank-b update (Eckart-Young)"] = [
        (S[b:] ** 2).sum().item() / (S**2).sum().item() for b in range(1, args.r + 1)
    ]
    print(
        f"relative test error (1.0 = base model), d={args.d}, r_max={args.r}, q={args.q}, {args.steps} steps\n"
    )
    print("| rank b | " + " | ".join(curves) + " |")
    print("|---" * (len(curves) + 1) + "|")
    for b in range(args.r):
        print(f"| {b + 1} | " + " | ".join(f"{c[b]:.4f}" for c in curves.values()) + " |")
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        ranks = list(range(1, args.r + 1))
        styles = ["o-", "s-", "x--", "d:", "^:", "k-"]
        for (name, c), st in zip(curves.items(), styles, strict=True):
            ax.plot(ranks, [max(v, 1e-5) for v in c], st, label=name, lw=1.2, ms=4)
        ax.set_yscale("log")
        ax.set_xlabel("rank b used at inference")
        ax.set_ylabel("test error / base model's error")
        ax.set_title(
            f"Error at each inference rank: d={args.d}, rank-{args.r} target, q={args.q}", fontsize=10
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        fig.savefig(args.out, dpi=110)
        print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
