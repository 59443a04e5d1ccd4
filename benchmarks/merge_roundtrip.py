"""How far one merge and unmerge (`lorakit.control.merged`) leaves a model's base weights from where they were.

The default model with a random adapter (r=16 on every linear layer, `init="random"`, so that B·A is not zero) in
each dtype given: how many base tensors changed, the share of their elements that changed, and the largest change.
This is why `lorakit train` evaluates a 16-bit base without merging (`lorakit.train.run._merges_back`).

    .venv/bin/python benchmarks/merge_roundtrip.py                  # float32 and bfloat16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402

import lorakit  # noqa: E402
from lorakit.control import merged  # noqa: E402


def roundtrip(dtype: torch.dtype, model_path: str | None) -> str:
    torch.manual_seed(0)
    model, _ = lorakit.load_model(model_path, dtype=dtype)
    lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32, targets="all-linear", init="random"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    with merged(model):
        pass
    after = {n: p.detach() for n, p in model.named_parameters() if n in before}
    changed = [n for n in before if not torch.equal(after[n], before[n])]
    elements = sum(int((after[n] != before[n]).sum()) for n in changed)
    total = sum(before[n].numel() for n in changed)
    largest = max((float((after[n].float() - before[n].float()).abs().max()) for n in changed), default=0.0)
    share = f"{100 * elements / total:.1f}%" if total else "none"
    return (
        f"{str(dtype).removeprefix('torch.')}: {len(changed)} of {len(before)} base tensors changed; "
        f"{share} of their elements; largest change {largest:.3g}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--model", default=None, help="HF folder or .gguf file (default: lorakit's default)")
    args = p.parse_args()
    for name in args.dtypes:
        print(roundtrip(getattr(torch, name), args.model))


if __name__ == "__main__":
    main()
