"""DyLoRA (Valipour et al. 2023): one adapter that works at every rank b ≤ r_max.

Training samples b ~ Uniform{min_rank..r_max} each optimizer step and runs the first b rows of A and columns of
B with scaling α/b (α/√b with rsLoRA). "frozen" mode updates only the b-th row/column (the first b−1 take part
in the forward, detached); "unfrozen" updates all of the first b. Rows that the step must not update are put
back after `optimizer.step()`, so Adam's momentum and weight decay cannot move them either (paper, Alg. 1).

At inference any b ≤ r_max works by truncation: `set_rank(model, b)`, or `export_rank` (`lorakit convert --rank
b`) writes a plain PEFT LoRA folder of rank b. Its scaling needs no folding: PEFT's rank-b adapter with
lora_alpha=α scales by α/b, exactly DyLoRA's scaling at b.

The adapter file is a plain PEFT LoRA folder of rank r_max (PEFT loads it as DyLoRA at full rank, which is what
it is); the nesting is recorded in the safetensors metadata under "lorakit.dylora", which PEFT never reads and
`lorakit.load_adapter` uses to give the adapter its DyLoRA variant back.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lorakit.atomic import atomic_dir
from lorakit.config import LoraConfig
from lorakit.control import merge, unmerge
from lorakit.errors import AdapterError, ConfigError
from lorakit.formats import CONFIG_NAME, WEIGHTS_NAME, read_metadata
from lorakit.layers import LoraAdapter, LoraLayer, Variant, register_variant
from lorakit.lora_format import read_adapter
from lorakit.registry import lora_layers, registry

log = logging.getLogger(__name__)

METADATA_KEY = "lorakit.dylora"
MODES = ("frozen", "unfrozen")


@register_variant
class DyLoraVariant(Variant):
    """Plain LoRA truncated to the first `rank` components with scaling α/rank; while training, this step's
    sampled rank and update mode instead."""

    name = "dylora"
    label = "DyLoRA"

    def __init__(
        self, r_max: int, alpha: float, rslora: bool, mode: str = "frozen", min_rank: int = 1
    ) -> None:
        self.r_max, self.alpha, self.rslora, self.mode, self.min_rank = r_max, alpha, rslora, mode, min_rank
        self.rank = r_max
        """Rank used at inference (eval mode, merge, export): `set_rank` changes it."""
        self.train_rank: int | None = None
        """This optimizer step's sampled rank, used in training mode (set by DyLoraMethod.before_step)."""

    @classmethod
    def create(cls, config: LoraConfig, module: str) -> DyLoraVariant:
        return cls(config.rank_for(module), config.alpha_for(module), config.use_rslora)

    def scaling(self, b: int) -> float:
        return self.alpha / math.sqrt(b) if self.rslora else self.alpha / b

    def factors(self, adapter: LoraAdapter) -> tuple[torch.Tensor, torch.Tensor, float]:
        b = self.rank
        return adapter.lora_A[:b], adapter.lora_B[:, :b], self.scaling(b)

    def train_factors(self, adapter: LoraAdapter, b: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The first b components; in frozen mode only the b-th carries gradient."""
        A, B = adapter.lora_A, adapter.lora_B
        if self.mode == "frozen" and b > 1:
            A = torch.cat([A[: b - 1].detach(), A[b - 1 : b]])
            B = torch.cat([B[:, : b - 1].detach(), B[:, b - 1 : b]], dim=1)
            return A, B, self.scaling(b)
        return A[:b], B[:, :b], self.scaling(b)

    def forward(
        self, layer: LoraLayer, adapter: LoraAdapter, x: torch.Tensor, base_out: torch.Tensor
    ) -> torch.Tensor:
        if layer.training and self.train_rank is not None:
            A, B, s = self.train_factors(adapter, self.train_rank)
        else:
            A, B, s = self.factors(adapter)
        if x.is_floating_point() and x.dtype != A.dtype:
            x = x.to(A.dtype)
        y = layer.handler.lora(layer.base_layer, adapter.dropout(x), A, B, s)
        return y if y.dtype == base_out.dtype else y.to(base_out.dtype)

    def metadata(self) -> dict[str, str]:
        record = {"r_max": self.r_max, "mode": self.mode, "min_rank": self.min_rank}
        return {METADATA_KEY: json.dumps(record, sort_keys=True)}

    @classmethod
    def restore(cls, model: nn.Module, name: str, value: str) -> None:
        restore(model, name, value)


# --------------------------------------------------------------------------------------------------------------
# Putting the variant on adapters, choosing the rank
# --------------------------------------------------------------------------------------------------------------


def attach(model: nn.Module, name: str = "default", *, mode: str = "frozen", min_rank: int = 1) -> None:
    """Make adapter `name` (already injected or loaded) a DyLoRA adapter of r_max = its rank, at full rank."""
    if mode not in MODES:
        raise ConfigError(f"dylora.mode must be one of {', '.join(MODES)}, got {mode!r}")
    info = registry(model).adapters.get(name)
    if info is None:
        raise AdapterError(f"no adapter {name!r} on {type(model).__name__}")
    check_lora_config(info.config, min_rank)
    for _, layer in lora_layers(model):
        if name in layer.adapters:
            a = layer.adapters[name]
            a.variant = DyLoraVariant(a.r, a.alpha, info.config.use_rslora, mode, min_rank)
            layer.row_cache = None


def check_lora_config(config, min_rank: int) -> None:
    """The LoRA settings DyLoRA cannot nest: per-module ranks, DoRA, PiSSA; and min_rank within 1..r."""
    if config.rank_pattern:
        raise ConfigError("DyLoRA needs one rank r_max for all modules; drop lora.rank_pattern")
    if config.use_dora:
        raise ConfigError("DyLoRA cannot be combined with DoRA (lora.use_dora); pick one")
    if config.lora_bias:
        raise ConfigError("DyLoRA does not support lora.lora_bias (a bias on B); drop it")
    for flag, what in ((config.use_kasa, "use_kasa (KaSA)"), (config.use_bdlora, "use_bdlora (BD-LoRA)")):
        if flag:
            raise ConfigError(f"DyLoRA cannot be combined with lora.{what}; pick one")
    if config.init == "pissa":
        raise ConfigError("DyLoRA cannot use PiSSA init: truncating B·A would leave W0 missing its top part")
    if not (isinstance(min_rank, int) and 1 <= min_rank <= config.r):
        raise ConfigError(f"dylora.min_rank must be in 1..lora.r ({config.r}), got {min_rank!r}")


def dylora_variants(model: nn.Module, name: str | None = None) -> list[tuple[str, DyLoraVariant]]:
    """(adapter name, variant) of every DyLoRA adapter in every layer (only adapter `name` if given)."""
    return [(n, v) for n, v, _ in dylora_adapters(model) if name is None or n == name]


def set_rank(model: nn.Module, rank: int, name: str | None = None) -> None:
    """Run DyLoRA adapter `name` (all DyLoRA adapters if None) at rank `rank` ≤ r_max from now on.

    Merged adapters are unmerged, switched, and merged again, so the base weights stay exact.
    """
    found = dylora_variants(model, name)
    if not found:
        which = f"adapter {name!r} is not" if name else "no adapter is"
        raise AdapterError(
            f"{which} a DyLoRA adapter on {type(model).__name__}; set_rank applies to adapters trained with "
            "--method dylora (a plain LoRA's components are not ordered, so truncating one changes it arbitrarily)"
        )
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"rank must be a positive integer, got {rank!r}")
    for n, v in found:
        if rank > v.r_max:
            raise AdapterError(
                f"rank {rank} is above r_max={v.r_max} of DyLoRA adapter {n!r} (choose 1..{v.r_max})"
            )
    was_merged = any(layer.merged for _, layer in lora_layers(model))
    if was_merged:
        unmerge(model)
    for _, v in found:
        v.rank = rank
    if was_merged:
        merge(model)


def restore(model: nn.Module, name: str, value: str) -> None:
    """Called by `load_adapter` for a file with "lorakit.dylora" metadata: DyLoRA at full rank."""
    try:
        record = json.loads(value)
        mode, min_rank = record.get("mode", "frozen"), int(record.get("min_rank", 1))
    except (ValueError, TypeError, AttributeError):
        raise AdapterError(f"adapter {name!r}: unreadable {METADATA_KEY} metadata {value!r}") from None
    attach(model, name, mode=mode if mode in MODES else "frozen", min_rank=min_rank)
    r = dylora_variants(model, name)[0][1].r_max
    log.info(
        "adapter %r is a DyLoRA adapter (ranks 1..%d); loaded at its full rank %d: lorakit.set_rank(model, b) "
        "runs it at a lower rank",
        name,
        r,
        r,
    )


# --------------------------------------------------------------------------------------------------------------
# Export at a rank: a pure function on files
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def export_rank(adapter: str | os.PathLike, rank: int, out: str | os.PathLike) -> Path:
    """Write DyLoRA adapter folder `adapter` truncated to rank `rank` as a plain PEFT LoRA folder `out`.

    A: first `rank` rows, B: first `rank` columns, lora_alpha unchanged (PEFT scales rank b by α/b, as DyLoRA
    does at b). The output still records its nesting, so it can be truncated further. Written atomically.
    """
    adapter = Path(adapter)
    config, tensors = read_adapter(adapter)
    meta = read_metadata(adapter)
    if METADATA_KEY not in meta:
        raise AdapterError(
            f"{adapter}: not a DyLoRA adapter (no {METADATA_KEY} record in its safetensors metadata); only a "
            "DyLoRA adapter's first b components form a rank-b adapter (train with --method dylora)"
        )
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= config.r:
        raise AdapterError(f"{adapter}: --rank {rank} is outside 1..{config.r} (the adapter's r_max)")
    cut: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key.endswith(("lora_A.weight", "lora_embedding_A")):
            t = t[:rank]
        elif key.endswith(("lora_B.weight", "lora_embedding_B")):
            t = t[:, :rank]
        cut[key] = t.contiguous()
    record = {**json.loads(meta[METADATA_KEY]), "r_max": rank, "exported_from_r": config.r}
    metadata = {**meta, METADATA_KEY: json.dumps(record, sort_keys=True)}
    peft = config.replace(r=rank).to_peft_dict()

    def write(tmp: Path) -> None:
        save_file(cut, str(tmp / WEIGHTS_NAME), metadata=metadata)
        (tmp / CONFIG_NAME).write_text(json.dumps(peft, indent=2, sort_keys=True) + "\n")

    out = Path(out)
    atomic_dir(out, write)
    log.info("wrote %s at rank %d (of %d) to %s", adapter, rank, config.r, out)
    return out


# --------------------------------------------------------------------------------------------------------------
# Training settings (the `dylora` section of `lorakit train`; the method is lorakit.train.methods.dylora)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class DyLoraConfig:
    """How DyLoRA samples and updates ranks while training. The largest rank r_max is the adapter's rank."""

    min_rank: int = 1
    """Smallest rank sampled each step (the largest is r_max, the adapter's rank: lora.r)."""
    mode: str = "frozen"
    """Update rule: "frozen" updates only the sampled rank's row/column, "unfrozen" all rows up to it."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"dylora.mode must be one of {', '.join(MODES)}, got {self.mode!r}")


def dylora_adapters(model: nn.Module) -> list[tuple[str, DyLoraVariant, LoraAdapter]]:
    """(adapter name, variant, adapter) of every DyLoRA adapter in every layer."""
    return [
        (n, a.variant, a)
        for _, layer in lora_layers(model)
        for n, a in layer.adapters.items()
        if isinstance(a.variant, DyLoraVariant)
    ]
