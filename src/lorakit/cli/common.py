"""What several subcommands share: the --model help, a timed model load, the --allow-pickle option."""

from __future__ import annotations

import argparse
import sys
import time

MODEL_HELP = "a Hugging Face model folder or a .gguf file (default: the bundled SmolLM2-135M-Instruct)"


def load(
    model_spec: str | None,
    device: str | None = None,
    dtype: str | None = None,
    num_labels: int | None = None,
    per_token: bool = False,
    bare: bool = False,
):
    """`lorakit.models.load_model` on `device` (auto: a GPU if there is one) in `dtype` (auto: bf16 on a GPU,
    and on a CPU with native bf16; else fp32), saying on stderr what was loaded, where, and how long it took.
    `num_labels`: as a sequence classifier (a reward model: 1); with `per_token`, as a token classifier; `bare`:
    without a head (an embedding model's)."""
    from lorakit.device import dtype_name, placement
    from lorakit.models import load_model

    t0 = time.perf_counter()
    where, precision = placement(device, dtype)
    model, tok = load_model(
        model_spec, dtype=precision, device=where, num_labels=num_labels, per_token=per_token, bare=bare
    )
    print(
        f"loaded {model_spec or 'SmolLM2-135M-Instruct (default)'} in {time.perf_counter() - t0:.1f} s"
        + ("" if where.type == "cpu" else f" on {where} in {dtype_name(precision)}"),
        file=sys.stderr,
    )
    return model, tok


def add_device(p: argparse.ArgumentParser) -> None:
    """--device and --dtype, for the commands that load a model."""
    p.add_argument(
        "--device", default="auto", help="auto (default: a CUDA GPU if there is one), cpu, cuda, cuda:N"
    )
    p.add_argument(
        "--dtype", default="auto", help="auto (bf16 on a GPU, and on a CPU with native bf16; else fp32), float32, bfloat16, float16"
    )


def add_allow_pickle(p: argparse.ArgumentParser, *, several: bool = False) -> None:
    """--allow-pickle, for the commands that read adapter files."""
    what = "pickled adapter_model.bin files" if several else "a pickled adapter_model.bin"
    p.add_argument("--allow-pickle", action="store_true", help=f"accept {what} (weights_only)")
