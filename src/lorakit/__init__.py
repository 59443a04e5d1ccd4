"""lorakit: Low-Rank Adaptation for PyTorch and Hugging Face models, in PEFT's file format.

>>> import lorakit
>>> model, tok = lorakit.load_model()                        # default SmolLM2-135M-Instruct
>>> lorakit.inject(model, lorakit.LoraConfig(r=8, targets=["q_proj", "v_proj"]))
>>> lorakit.save_adapter(model, "out/adapter")
"""

from __future__ import annotations

from lorakit.arrow import arrow
from lorakit.attention import lean_attention, set_lean_attention
from lorakit.bank import AdapterBank
from lorakit.blocks import lean_blocks, set_lean_blocks
from lorakit.combine import combine
from lorakit.config import LoraConfig
from lorakit.control import active_adapters, disabled, merge, set_active, unmerge
from lorakit.errors import (
    AdapterError,
    AdapterFileError,
    ConfigError,
    LorakitError,
    ModelLoadError,
    QuantizationError,
    TargetError,
)
from lorakit.extract import extract
from lorakit.fused import set_fused
from lorakit.hotswap import hotswap, prepare_hotswap
from lorakit.inject import adapter_names, delete_adapter, inject, lora_layers, unload
from lorakit.io import adapter_state_dict, describe_adapter, load_adapter, read_adapter, save_adapter
from lorakit.layers import LoraLayer, delta_weight
from lorakit.lean import lean_loss_enabled, set_lean_loss
from lorakit.mixed import row_adapters
from lorakit.ondevice import export_gguf
from lorakit.quant import dequantize, quantize
from lorakit.quant.load import load_quantized
from lorakit.report import format_report, parameter_report
from lorakit.targeting import select_modules
from lorakit.variants.adalora import AdaLoraAllocator, AdaLoraConfig, inject_adalora, orth_loss
from lorakit.variants.corda import CordaResult, corda_covariances, inject_corda
from lorakit.variants.eva import EvaResult, eva_components, inject_eva
from lorakit.variants.kasa import kasa_loss
from lorakit.variants.ladder import LadderConfig, attach_ladder, detach_ladder
from lorakit.variants.ladder_io import format_ladder, is_ladder_folder, save_ladder
from lorakit.variants.loraga import LoraGaResult, inject_loraga, loraga_gradients
from lorakit.variants.loraplus import loraplus_groups, loraplus_optimizer


def run_training(config, **kwargs):
    """Train a LoRA adapter as a `RunConfig` says (what `lorakit train` runs); returns the summary dict."""
    from lorakit.train.run import run_training as _run

    return _run(config, **kwargs)


def load_model(spec=None, **kwargs):
    """Load a base model and tokenizer: None for the default SmolLM2-135M-Instruct, a HF folder or a .gguf file."""
    from lorakit.models import load_model as _load_model

    return _load_model(spec, **kwargs)


def set_rank(model, rank: int, name: str | None = None) -> None:
    """Run DyLoRA adapter `name` (all DyLoRA adapters if None) at rank `rank` ≤ r_max (lorakit.variants.dylora)."""
    from lorakit.variants.dylora import set_rank as _set_rank

    _set_rank(model, rank, name)


def export_rank(adapter, rank: int, out):
    """Write DyLoRA adapter folder `adapter` at rank `rank` as a plain PEFT LoRA folder `out` (`lorakit convert`)."""
    from lorakit.variants.dylora import export_rank as _export_rank

    return _export_rank(adapter, rank, out)


def adapter_parameters(model, name: str | None = None):
    """The parameters of adapter `name` (all adapters if None), declared by the LoRA layers and the adapter's
    copies of the modules it saves whole (modules_to_save), its token rows and its factors on parameters
    (target_parameters), not found by name."""
    from lorakit.params import param_parameters
    from lorakit.saved import copy_parameters
    from lorakit.token_rows import token_parameters

    for _, layer in lora_layers(model):
        for aname, adapter in layer.adapters.items():
            if name is None or aname == name:
                yield from adapter.parameters()
    yield from copy_parameters(model, name)
    yield from token_parameters(model, name)
    yield from param_parameters(model, name)


__version__ = "0.1.0"
__all__ = [
    "AdaLoraAllocator",
    "AdaLoraConfig",
    "AdapterBank",
    "AdapterError",
    "AdapterFileError",
    "ConfigError",
    "CordaResult",
    "LoraGaResult",
    "EvaResult",
    "LadderConfig",
    "LoraConfig",
    "LoraLayer",
    "LorakitError",
    "ModelLoadError",
    "QuantizationError",
    "TargetError",
    "active_adapters",
    "adapter_names",
    "adapter_parameters",
    "adapter_state_dict",
    "attach_ladder",
    "combine",
    "delete_adapter",
    "delta_weight",
    "detach_ladder",
    "dequantize",
    "export_gguf",
    "extract",
    "describe_adapter",
    "disabled",
    "corda_covariances",
    "loraga_gradients",
    "eva_components",
    "export_rank",
    "format_ladder",
    "format_report",
    "hotswap",
    "inject",
    "inject_adalora",
    "inject_corda",
    "inject_loraga",
    "inject_eva",
    "is_ladder_folder",
    "kasa_loss",
    "lean_attention",
    "lean_blocks",
    "lean_loss_enabled",
    "load_adapter",
    "load_model",
    "load_quantized",
    "lora_layers",
    "loraplus_groups",
    "loraplus_optimizer",
    "merge",
    "orth_loss",
    "parameter_report",
    "prepare_hotswap",
    "quantize",
    "read_adapter",
    "row_adapters",
    "arrow",
    "run_training",
    "save_adapter",
    "save_ladder",
    "select_modules",
    "set_active",
    "set_fused",
    "set_lean_loss",
    "set_lean_blocks",
    "set_lean_attention",
    "set_rank",
    "unload",
    "unmerge",
]
