"""LoftQ initialisation (Li et al. 2023) for a 4-bit base: A and B chosen so that Q + s·B·A ≈ W0.

Plain QLoRA starts from B = 0, so the first forward pass carries the whole quantization error W0 − Q. LoftQ
alternates, as PEFT's `loftq_utils.loftq_init` does, for `loftq_iter` steps:

    res ← W0;  repeat:  Q ← NF4(res);  L·R ← best rank-r approximation of W0 − deq(Q);  res ← W0 − L·R

and starts the adapter at B = L/√s, A = R/√s (PEFT sets B = L, A = R, which is the same when alpha = r; dividing
by √s keeps Q + s·B·A ≈ W0 for any alpha). With one step Q is NF4(W0), the base's own codes, so the adapter fits
any NF4 copy of the same weights; with more, the layer's codes become NF4(W0 − L·R) (removing the adapter puts the
old codes back).

W0 is read again from the checkpoint the base was loaded from (`load_quantized`, `lorakit train
--model.quantize nf4`), one layer at a time: a 4-bit layer no longer holds it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from lorakit.errors import AdapterError
from lorakit.formats import WEIGHTS_NAME, register_load_hook, register_metadata
from lorakit.layers import LoraAdapter, LoraLayer, register_init
from lorakit.quant.nf4 import NF4Linear
from lorakit.readers import safetensors_metadata
from lorakit.registry import adapter_layers

log = logging.getLogger(__name__)
METADATA_KEY = "lorakit.loftq"


def _nf4(w: torch.Tensor, like: NF4Linear) -> NF4Linear:
    """`w` quantized the way `like` is (block size, double quantization)."""
    linear = SimpleNamespace(weight=w, in_features=like.in_features, out_features=like.out_features, bias=None)
    return NF4Linear.from_linear(linear, double_quant=like.double_quant, block_size=like.block_size)


def _low_rank(res: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) = (U·√S, √S·Vh) of the top r singular triplets (PEFT's `_low_rank_decomposition`)."""
    u, s, vh = torch.linalg.svd(res, full_matrices=False)
    root = torch.sqrt(s[:r])
    return u[:, :r] * root, root[:, None] * vh[:r]


@torch.no_grad()
def loftq(w0: torch.Tensor, like: NF4Linear, r: int, iters: int) -> tuple[NF4Linear, torch.Tensor, torch.Tensor]:
    """(Q as an NF4 layer like `like`, L, R) after `iters` LoftQ steps on the full-precision weight `w0`."""
    w0 = w0.float()
    res = w0
    for i in range(iters):
        q = _nf4(res, like)
        left, right = _low_rank(w0 - q.dequantize(torch.float32), r)
        if i + 1 == iters:
            break
        res = w0 - left @ right
    return q, left, right


@torch.no_grad()
def loftq_init(layer: LoraLayer, adapter: LoraAdapter) -> None:
    base = layer.base_layer
    if not isinstance(base, NF4Linear):
        raise AdapterError(
            f"LoftQ init is for a 4-bit (NF4) base, and this layer is a {type(base).__name__}: load the model "
            "with lorakit.load_quantized (lorakit train --model.quantize nf4) first"
        )
    source = getattr(base, "source", None)
    if source is None:
        raise AdapterError(
            "LoftQ init needs the full-precision weights, which a model quantized in memory no longer has: load "
            "it with lorakit.load_quantized(folder) (lorakit train --model.quantize nf4), which reads them back"
        )
    iters = adapter.init_config.loftq_iter if adapter.init_config is not None else 1
    q, left, right = loftq(source(), base, adapter.r, iters)
    root = math.sqrt(adapter.scaling)
    adapter.lora_A.copy_((right / root).to(adapter.lora_A.dtype))
    adapter.lora_B.copy_((left / root).to(adapter.lora_B.dtype))
    if iters > 1:  # the base takes NF4(W0 - L·R); removing the adapter gives the old codes back
        old = {n: b.clone() for n, b in base.named_buffers()}
        for n, b in q.named_buffers():
            getattr(base, n).copy_(b)

        def restore() -> None:
            for n, b in old.items():
                getattr(base, n).copy_(b)

        adapter.on_remove = restore


def loftq_metadata(model: nn.Module, name: str) -> dict[str, str]:
    """{"lorakit.loftq": {"iter": N}} for an adapter LoftQ initialised (N > 1 means its base was re-quantized)."""
    for _, layer in adapter_layers(model, name):
        cfg = layer.adapters[name].init_config
        if cfg is not None and cfg.init == "loftq":
            return {METADATA_KEY: json.dumps({"iter": cfg.loftq_iter})}
    return {}


def note_loftq_base(model: nn.Module, path: Path) -> None:
    """Warn when an adapter whose LoftQ init re-quantized its base is loaded: this base has other codes."""
    file = Path(path) / WEIGHTS_NAME
    raw = safetensors_metadata(file).get(METADATA_KEY) if file.is_file() else None
    try:
        iters = json.loads(raw).get("iter", 1) if raw else 1
    except (ValueError, AttributeError):
        iters = 1
    if isinstance(iters, int) and iters > 1:
        log.warning(
            "%s was initialised with LoftQ in %d steps, which re-quantized its base layers; on another base "
            "(a plain NF4 load, or full precision) its outputs differ from the training-time model's",
            path,
            iters,
        )


register_init("loftq", loftq_init)
register_metadata(loftq_metadata)
register_load_hook(note_loftq_base)
