"""Export a merged model: base + adapter folded into plain weights, written as a Hugging Face folder that
`transformers` loads without lorakit."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from lorakit.atomic import atomic_dir
from lorakit.inject import unload
from lorakit.io import load_adapter

log = logging.getLogger(__name__)


def merge_to_folder(
    model_spec: str | os.PathLike | None,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
) -> Path:
    """Load the base model, merge `adapter` into it, and write model + tokenizer to `out` atomically."""
    from lorakit.models import load_model

    model, tokenizer = load_model(model_spec, dtype=dtype)
    load_adapter(model, adapter, allow_pickle=allow_pickle)
    model = unload(model, merge=True)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    out = Path(out)
    atomic_dir(out, write)
    log.info("wrote merged model to %s", out)
    return out
