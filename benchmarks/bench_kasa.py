"""What KaSA's truncation of W0 costs SmolLM2-135M before any training, per module type, in float32.

KaSA drops each adapted weight's r smallest singular components. This measures, on a few real sentences (the
bundled chatterbot corpus is not needed: four fixed English sentences), for each of the seven projection types
alone and for all of them together:
- the language-model loss of the model with a new KaSA adapter (B = 0, so only the truncation acts), against the
  base model's loss;
- the share of each projection's output that the dropped part carries on those inputs, ‖U_d·S_d·Vh_d·x‖ / ‖W·x‖
  (median and largest over the 30 layers), and its share of ‖W‖_F.

    .venv/bin/python benchmarks/bench_kasa.py --ranks 4 16

With `--precision R`: instead, how far a new KaSA adapter of rank R on the seven projections is from the model
truncated in float64, in lorakit (W0 kept, the dropped part subtracted) and in PEFT (W0 rebuilt from its kept
float32 triplets), as the largest logit difference on one sentence.
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch

import lorakit

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXT = [
    "The capital of France is Paris. It is known for the Eiffel Tower and its museums, like the Louvre.",
    "Water boils at one hundred degrees Celsius at sea level, and freezes at zero.",
    "She opened the window, looked at the rain, and decided to stay at home with a book.",
    "To sort a list in Python, call sorted() on it, or use the list's own sort() method.",
]


def loss_of(model, batch) -> float:
    with torch.no_grad():
        return float(
            model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
        )


def precision(r: int) -> None:
    import tempfile

    import peft
    from torch.func import functional_call

    model, tok = lorakit.load_model(dtype=torch.float32)
    x = tok([TEXT[0]], return_tensors="pt")["input_ids"]
    ref = lorakit.load_model(dtype=torch.float32)[0].double()
    weights = {}
    for n, p in ref.named_parameters():
        if n.endswith(".weight") and n.rsplit(".", 2)[-2] in SEVEN:
            u, s, vh = torch.linalg.svd(p.detach(), full_matrices=False)
            k = s.shape[0] - r
            weights[n] = (u[:, :k] * s[:k]) @ vh[:k]
    with torch.no_grad():
        exact = functional_call(ref, weights, (x,)).logits.float()
        lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=2 * r, targets=SEVEN, use_kasa=True))
        ours = model(x).logits
        with tempfile.TemporaryDirectory() as d:
            lorakit.save_adapter(model, d)
            theirs = (
                peft.PeftModel.from_pretrained(lorakit.load_model(dtype=torch.float32)[0], d).eval()(x).logits
            )
    print(
        f"r={r}: largest logit difference to the float64 truncation: lorakit {float((ours - exact).abs().max()):.2e}, "
        f"PEFT {float((theirs - exact).abs().max()):.2e}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 16])
    p.add_argument(
        "--precision", type=int, metavar="R", help="measure the truncation's precision at rank R instead"
    )
    args = p.parse_args()
    if args.precision:
        precision(args.precision)
        return
    torch.manual_seed(0)
    model, tok = lorakit.load_model(dtype=torch.float32)
    model.eval()
    tok.padding_side = "right"
    batch = tok(TEXT, return_tensors="pt", padding=True)
    print(f"cpu: {platform.processor() or platform.machine()}, {torch.backends.cpu.get_cpu_capability()}")
    base = loss_of(model, batch)
    print(f"base model loss: {base:.3f}")

    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, n=n: inputs.__setitem__(n, inp[0].detach()))
        for n, m in model.named_modules()
        if n.endswith(tuple(SEVEN))
    ]
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    mask = batch["attention_mask"].bool()

    print(
        "\n| r | module | loss with the truncation | dropped share of the output (median, max over layers) | share of ‖W‖_F (median) |"
    )
    print("|---:|---|---:|---|---:|")
    for r in args.ranks:
        for target in [*SEVEN, "all seven"]:
            lorakit.inject(
                model,
                lorakit.LoraConfig(
                    r=r, alpha=2 * r, targets=SEVEN if target == "all seven" else [target], use_kasa=True
                ),
                "k",
            )
            loss = loss_of(model, batch)
            lorakit.delete_adapter(model, "k")
            share = wshare = ""
            if target != "all seven":
                out, ws = [], []
                for n, x in inputs.items():
                    if not n.endswith(target):
                        continue
                    w = model.get_submodule(n).weight.detach()
                    u, s, vh = torch.linalg.svd(w, full_matrices=False)
                    xs = x[mask]
                    dropped = ((xs @ vh[-r:].T) * s[-r:]) @ u[:, -r:].T
                    out.append(float(dropped.norm() / (xs @ w.T).norm()))
                    ws.append(float(s[-r:].norm() / s.norm()))
                share = f"{100 * statistics.median(out):.2f}%, {100 * max(out):.2f}%"
                wshare = f"{100 * statistics.median(ws):.2f}%"
            print(f"| {r} | {target} | {loss:.3f} ({loss / base:.2f}×) | {share} | {wshare} |", flush=True)


if __name__ == "__main__":
    main()
