"""What several subcommands share: the --model help, a timed model load, the --allow-pickle option."""

from __future__ import annotations

import argparse
import sys
import time

MODEL_HELP = "a Hugging Face model folder or a .gguf file (default: the bundled SmolLM2-135M-Instruct)"


def load(model_spec: str | None):
    """`lorakit.models.load_model`, saying on stderr what was loaded and how long it took."""
    from lorakit.models import load_model

    t0 = time.perf_counter()
    model, tok = load_model(model_spec)
    print(
        f"loaded {model_spec or 'SmolLM2-135M-Instruct (default)'} in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    return model, tok


def add_allow_pickle(p: argparse.ArgumentParser, *, several: bool = False) -> None:
    """--allow-pickle, for the commands that read adapter files."""
    what = "pickled adapter_model.bin files" if several else "a pickled adapter_model.bin"
    p.add_argument("--allow-pickle", action="store_true", help=f"accept {what} (weights_only)")
