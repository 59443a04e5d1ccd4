"""RSS after each forward, backward and optimizer step of LoRA training on the default model, fp32 or NF4 base.

Shows where memory goes step by step (and the glibc heap growth that a fixed mmap threshold removes):

    .venv/bin/python benchmarks/trace_rss.py nf4 --batch 1 --seq 128 --steps 6
    MALLOC_MMAP_THRESHOLD_=262144 .venv/bin/python benchmarks/trace_rss.py nf4 --batch 1 --seq 128 --steps 6
"""

from __future__ import annotations

import argparse

import torch

import lorakit
from lorakit.bench import TARGETS, hwm_gb, reset_peak_rss, rss_now_gb
from lorakit.head import causal_lm_loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", choices=["fp32", "nf4"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--r", type=int, default=16)
    p.add_argument(
        "--eager", action="store_true", help="nf4: load in full precision, then quantize (not load_quantized)"
    )
    args = p.parse_args()
    print(f"after imports: RSS {rss_now_gb():.3f} GB")
    if args.base == "nf4" and args.eager:
        model, _ = lorakit.load_model()
        lorakit.quantize(model)
    elif args.base == "nf4":
        model, _, _ = lorakit.load_quantized()
    else:
        model, _ = lorakit.load_model()
    print(f"after load:    RSS {rss_now_gb():.3f} GB, peak {hwm_gb():.3f} GB")
    lorakit.inject(model, lorakit.LoraConfig(r=args.r, alpha=args.r, targets=TARGETS))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(
        0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)
    )
    reset_peak_rss()
    for step in range(args.steps):
        loss = causal_lm_loss(model, {"input_ids": ids, "labels": ids})
        fwd = rss_now_gb()
        loss.backward()
        bwd = rss_now_gb()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(
            f"step {step + 1}: RSS after forward {fwd:.3f}, backward {bwd:.3f}, optimizer {rss_now_gb():.3f} GB; "
            f"peak since load {hwm_gb():.3f} GB"
        )


if __name__ == "__main__":
    main()
