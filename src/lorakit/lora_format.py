"""PEFT's LORA adapter layout: the format that `lorakit.formats` picks for `peft_type` "LORA".

Tensor keys drop the adapter name: `base_model.model.<module>.lora_A.weight` (r, in), `...lora_B.weight` (out, r);
Embedding targets use `lora_embedding_A` (r, vocab) and `lora_embedding_B` (dim, r); DoRA adds
`lora_magnitude_vector`: each variant declares its tensors (`Variant.tensor_names`). Scaling is never stored.
modules_to_save, trainable token rows and target_parameters are keyed as PEFT keys them. A load is planned (every
file and shape check) before the model changes, then applied all or nothing.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.classifier_heads import backbone_tensors
from lorakit.config import INITS_IN_WEIGHTS, LoraConfig
from lorakit.errors import AdapterError, AdapterFileError, TargetError
from lorakit.formats import (
    CONFIG_NAME,
    DEFAULT,
    PREFIX,
    AdapterFormat,
    file_config,
    file_metadata,
    folder_format,
    read_metadata,
    read_tensors,
    register_format,
    task_heads,
    write_folder,
)
from lorakit.handlers import all_handlers, handler_for
from lorakit.inject import check_new_name, delete_adapter, inject, set_trainable
from lorakit.layers import INIT_FACTORS, VARIANTS, Variant, variant_class
from lorakit.params import file_keys, param_wrappers
from lorakit.peft_keys import TRAINING_ONLY_TENSORS
from lorakit.plain_lora import as_plain_lora, plain_file, with_starts
from lorakit.registry import adapter_layers, lora_layers, registry
from lorakit.replicate import replicated
from lorakit.saved import copies_of, in_saved_module
from lorakit.saved_plan import TOKEN_KEY, plan_saved, saved_tensors, token_tensors
from lorakit.targeting import select_modules
from lorakit.token_rows import token_rows_of
from lorakit.tying import as_peft_ties, check_file
from lorakit.tying import plan as tie_plan
from lorakit.walk import base_parameters

log = logging.getLogger(__name__)


def read_adapter(
    path: str | os.PathLike, *, allow_pickle: bool = False
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read and validate a LoRA adapter folder: (config, tensors). Raises AdapterFileError / ConfigError with the
    file named."""
    fmt, raw = folder_format(path)
    cfg_file = Path(path) / CONFIG_NAME
    if fmt.peft_type != DEFAULT:
        article = "an" if fmt.label[0] in "AEIOUaeiou" else "a"
        raise AdapterFileError(
            f"{cfg_file}: {article} {fmt.label} adapter (peft_type {fmt.peft_type}), not plain LoRA; this reads "
            f"LoRA files only (lorakit.load_adapter loads {fmt.label} adapters onto a model)"
        )
    config = LoraConfig.from_peft_dict(raw, source=str(cfg_file))
    return config, read_tensors(Path(path), allow_pickle)


def _lora_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    info = registry(model).adapters.get(name)
    if info is None:
        raise AdapterError(
            f"no adapter {name!r} on {type(model).__name__}; adapters: {list(registry(model).adapters)}"
        )
    out: dict[str, torch.Tensor] = {}
    for mname, layer in adapter_layers(model, name):
        for suffix, t in layer.adapters[name].adapter_params(layer.handler).items():
            out[f"{PREFIX}{mname}.{suffix}"] = t.detach().clone().contiguous()
    if info.config.bias == "all":
        for pname, p in base_parameters(model):
            if (pname == "bias" or pname.endswith(".bias")) and not in_saved_module(pname):
                out[PREFIX + pname] = p.detach().clone().contiguous()
    elif info.config.bias == "lora_only":
        for mname in info.modules:
            bias = getattr(model.get_submodule(mname).base_layer, "bias", None)
            if bias is not None:
                out[f"{PREFIX}{mname}.base_layer.bias"] = bias.detach().clone().contiguous()
    for mname, module in copies_of(model, name).items():  # modules_to_save, keyed as PEFT saves them
        for k, t in module.state_dict().items():
            out[f"{PREFIX}{mname}.{k}"] = t.detach().clone().contiguous()
    for mname, rows in token_rows_of(model, name).items():  # trainable_token_indices: the rows' values
        out[f"{PREFIX}{mname}.{TOKEN_KEY}"] = rows.detach().clone().contiguous()
    for mname, wrapper in param_wrappers(model):  # target_parameters, nested as PEFT nests its wrappers
        if name in wrapper.lora:
            factors = wrapper.lora[name]
            for p, where in file_keys(mname, list(factors)).items():
                out[f"{PREFIX}{where}.lora_A.weight"] = factors[p].lora_A.detach().clone().contiguous()
                out[f"{PREFIX}{where}.lora_B.weight"] = factors[p].lora_B.detach().clone().contiguous()
    return out




def save_lora(model: nn.Module, path: Path, name: str, plain: bool = False) -> Path:
    """Write LoRA adapter `name` as PEFT's folder at `path`; `plain`: a KaSA or BD-LoRA adapter as the plain LoRA
    pair of its change to W0 (`plain_lora.plain_file`)."""
    tensors = _lora_state_dict(model, name)
    config = file_config(model, registry(model).adapters[name])
    config = with_starts(model, name, config, tensors)  # CorDA, LoRA-GA, ...: written as plain LoRA
    if plain:  # KaSA, BD-LoRA: as the LoRA pair of their change to W0
        config = plain_file(model, name, config, tensors)
    metadata = {**file_metadata(model, name), **_variant_metadata(model, name)}  # e.g. DyLoRA's nesting
    peft_dict = config.to_peft_dict()
    info = registry(model).adapters[name]
    saved = info.saved
    heads = {} if saved else task_heads(model, config.task_type)
    if info.tokens and isinstance(config.trainable_token_indices, dict):
        peft_dict["trainable_token_indices"] = dict(
            info.tokens
        )  # full module names: PEFT re-selects exactly them
    if saved:
        peft_dict["modules_to_save"] = list(saved)
    elif heads:  # PEFT's classification wrappers load the head from the file: the model's own, unchanged
        peft_dict["modules_to_save"] = sorted(heads)
        for h, module in heads.items():
            for pname, p in module.named_parameters():
                tensors[f"{PREFIX}{h}.{pname}"] = p.detach().clone().contiguous()
    write_folder(path, tensors, peft_dict, metadata)
    log.info("saved adapter %r (%d tensors) to %s", name, len(tensors), path)
    return path


def _variant_metadata(model: nn.Module, name: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for _, layer in adapter_layers(model, name):
        out.update(layer.adapters[name].variant.metadata())
    return out


def _recorded_variant(meta: dict[str, str]) -> str | None:
    """The registered variant an adapter file's metadata records ("lorakit.<variant name>"), if any."""
    return next((k[8:] for k in meta if k.startswith("lorakit.") and k[8:] in VARIANTS), None)


def _restore_variants(model: nn.Module, name: str, meta: dict[str, str]) -> None:
    """Give adapter `name` the state beyond its tensors that its file's metadata records (e.g. DyLoRA's mode)."""
    variant = _recorded_variant(meta)
    if variant is not None:
        VARIANTS[variant].restore(model, name, meta[f"lorakit.{variant}"])


@dataclass
class LoraPlan:
    config: LoraConfig
    variant: str | None  # the registered variant the file's metadata names, if any (e.g. "dylora")
    copies: list[tuple[str, str, torch.Tensor]]  # (module, adapter attribute or "bias", tensor)
    metadata: dict[str, str]
    saved: list[tuple[str, str, torch.Tensor]] = field(default_factory=list)  # (module, state key, tensor)


def _plan_lora(model: nn.Module, path: Path, raw: dict[str, Any], name: str, allow_pickle: bool) -> LoraPlan:
    check_new_name(model, name)
    config = as_peft_ties(LoraConfig.from_peft_dict(raw, source=str(path / CONFIG_NAME)))
    tensors = backbone_tensors(model, config.task_type, read_tensors(path, allow_pickle), path)
    meta = read_metadata(path)
    variant = _recorded_variant(meta)
    cls = variant_class(config, variant)
    with replicated(model, config.layer_replication):  # the file names the replicated layers
        config, saved, tensors = plan_saved(model, config, tensors, path)
        return LoraPlan(config, variant, _plan_copies(model, config, cls, tensors, path), meta, saved)


def plan_lora_tensors(
    model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor], source: Path, name: str
) -> LoraPlan:
    """A plain-LoRA load plan from tensors keyed as in PEFT's file (for formats that read another layout and
    translate it, such as llama.cpp's GGUF adapters). Checks every shape; the model is not changed."""
    check_new_name(model, name)
    config, saved, tensors = plan_saved(model, config, tensors, source)
    return LoraPlan(config, None, _plan_copies(model, config, Variant, tensors, source), {}, saved)


def _apply_lora(model: nn.Module, plan: LoraPlan, name: str, trainable: bool) -> str:
    config = plan.config  # LoftQ, EVA, MiCA: what the init computed is in the file's A and B
    in_weights = config.init in INITS_IN_WEIGHTS
    if in_weights:
        config = config.replace(init="default")
    tensors = plan.copies
    if config.pissa_niter:
        warnings.warn(
            f"init_lora_weights='pissa_niter_{config.pissa_niter}': the start W0 - s·B0·A0 came from random draws the "
            "file does not hold; it is computed again by the exact SVD, which the randomised one approximated (as "
            "PEFT's own load computes it again), so the outputs are close to, not equal to, the trained model's",
            stacklevel=3,
        )
        config = config.replace(pissa_niter=0)  # the exact start (as_plain_lora, or PiSSA's init to train on)
    if config.init in INIT_FACTORS and not trainable:  # PiSSA, OLoRA: leave W0 alone (for the other adapters)
        config, tensors = as_plain_lora(model, config, tensors)
    inject(model, config, name, activate=False, trainable=trainable, variant=plan.variant, zeros=True)
    if in_weights:  # the adapter keeps its init's name (saved again as such; MiCA's B frozen in training)
        registry(model).adapters[name].config = plan.config
        set_trainable(model, only=[name])
    try:
        with torch.no_grad():
            copies, rows = (copies_of(model, name), token_rows_of(model, name)) if plan.saved else ({}, {})
            for module, key, tensor in plan.saved:
                if key.startswith("param:"):
                    _, p, which = key.split(":")
                    target = getattr(model.get_submodule(module).lora[name][p], which)
                else:
                    target = rows[module] if key == TOKEN_KEY else copies[module].state_dict()[key]
                target.copy_(tensor.to(target.dtype))
            layers = dict(lora_layers(model))
            for module, attr, tensor in tensors:
                if attr == "bias":
                    target = _bias_param(model, module)
                else:
                    target = getattr(layers[module].adapters[name], attr)
                target.copy_(tensor.to(target.dtype))
        _restore_variants(model, name, plan.metadata)  # e.g. DyLoRA's mode and min_rank
    except Exception:
        delete_adapter(model, name)
        raise
    return name


def _suffixes(variant: Variant) -> dict[str, str]:
    """PEFT key suffix -> adapter attribute, for every kind of base layer."""
    return {key: attr for h in all_handlers() for attr, key in variant.tensor_names(h).items()}


def _split_key(key: str, suffixes: dict[str, str]) -> tuple[str, str] | None:
    """'base_model.model.<module>.<suffix>' -> (module, attribute), or None if it is not an adapter tensor."""
    k = key[len(PREFIX) :] if key.startswith(PREFIX) else key
    for suffix, attr in suffixes.items():
        if k.endswith("." + suffix):
            return k[: -len(suffix) - 1], attr
    return None


def _plan_copies(
    model: nn.Module, config: LoraConfig, cls: type[Variant], tensors: dict[str, torch.Tensor], path: Path
) -> list[tuple[str, str, torch.Tensor]]:
    """Match file tensors to modules and check every shape. Returns (module, attribute, tensor) to copy."""
    try:
        modules = [] if config.target_parameters and not config.targets else select_modules(model, config)
        tie = tie_plan(model, config, modules, [], plain=cls is Variant, warn=False)
    except TargetError as e:
        raise AdapterError(f"{path}: adapter does not fit {type(model).__name__}: {e}") from None
    modules = tie.names
    variant = cls.create(config, "")
    suffixes = _suffixes(variant)
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    biases: list[tuple[str, str, torch.Tensor]] = []
    params = dict(base_parameters(model, remove_duplicate=False))  # the model's own weights, not the adapters'
    for key, t in tensors.items():
        split = _split_key(key, suffixes)
        k = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        if split is not None:
            by_module.setdefault(split[0], {})[split[1]] = t
        elif k.endswith(".bias") and config.bias != "none":
            biases.append(_plan_bias(model, k, t, path))
        elif k in params:  # a copy of a model weight (PEFT's modules_to_save, e.g. a classifier head)
            _check_copy(model, key, k, t, params[k], path)
        elif (own := k.replace(".base_layer.", ".")) in params:  # PEFT's save_embedding_layers: the base's weight
            _check_copy(model, key, own, t, params[own], path, base=True)
        elif any(part in k for part in TRAINING_ONLY_TENSORS):  # VeLoRA's, MonteCLoRA's: their config warned
            continue
        else:
            log.warning("%s: ignoring tensor %s (not a LoRA weight)", path, key)
    stray = sorted(set(by_module) - set(modules))
    if stray:
        raise AdapterError(
            f"{path}: tensors for modules the config does not select in {type(model).__name__}: {stray[:3]}"
        )
    plan: list[tuple[str, str, torch.Tensor]] = []
    for m in modules:
        if tie.lora is not None and m == tie.lora[1]:  # a view of the embedding's (ensure_weight_tying)
            check_file(str(path), m, tie.lora[0], by_module.get(m, {}), by_module.get(tie.lora[0], {}))
            continue
        try:
            own = cls.create(config, m)  # per module: BD-LoRA's block-diagonal factor depends on the name
        except TargetError as e:
            raise AdapterError(f"{path}: adapter does not fit {type(model).__name__}: {e}") from None
        plan += _plan_module(model, config, own, m, by_module.get(m, {}), path)
    return plan + biases


def _plan_module(
    model: nn.Module, config: LoraConfig, variant: Variant, m: str, found: dict[str, torch.Tensor], path: Path
) -> list[tuple[str, str, torch.Tensor]]:
    module = model.get_submodule(m)
    handler = handler_for(module)
    base = getattr(module, "base_layer", module)
    names = variant.tensor_names(handler)
    out = []
    for attr, shape in variant.tensor_shapes(handler, base, config.rank_for(m)).items():
        t = found.get(attr)
        if t is None:
            raise AdapterError(f"{path}: missing tensor {PREFIX}{m}.{names[attr]}")
        if tuple(t.shape) != tuple(shape):
            raise AdapterError(
                f"{path}: {m}.{attr} has shape {tuple(t.shape)} but {type(base).__name__} "
                f"{tuple(handler.weight(base).shape)} with r={config.rank_for(m)} needs {tuple(shape)}"
            )
        out.append((m, attr, t))
    return out


def _check_copy(
    model: nn.Module, key: str, name: str, t: torch.Tensor, p: torch.Tensor, path: Path, *, base: bool = False
) -> None:
    """A file tensor that copies model weight `name` (PEFT's modules_to_save) must equal it: lorakit keeps no
    trained copies of whole modules, and silently using the model's own instead would change the adapter. `base`:
    the base weight PEFT writes beside an adapted embedding (save_embedding_layers)."""
    if base and t.shape == p.shape and _rounding_apart(t, p.detach().cpu()):
        log.warning("%s: %s differs from %s.%s by rounding only; using the model's", path, key, type(model).__name__, name)
        return
    if t.shape != p.shape or not torch.equal(t.to(p.dtype), p.detach().cpu()):
        if base:
            raise AdapterError(
                f"{path}: {key} is {type(model).__name__}.{name} as PEFT saved it beside the adapter "
                "(save_embedding_layers), and it differs from this model's (another vocabulary, or resized?)"
            )
        raise AdapterError(
            f"{path}: {key} is a trained copy of {type(model).__name__}.{name} (PEFT modules_to_save), which "
            "lorakit does not load (only LoRA weights); its values differ from the model's own"
        )


def _rounding_apart(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two copies of one weight differ by no more than the coarser dtype's rounding (a bf16 checkpoint of an
    fp32 model, or the model converted from another file of the same weights): 4 units in the last place."""
    eps = max(torch.finfo(a.dtype).eps, torch.finfo(b.dtype).eps)
    a, b = a.double(), b.double()
    return bool(((a - b).abs() <= 4 * eps * torch.maximum(a.abs(), b.abs())).all())


def _plan_bias(model: nn.Module, key: str, t: torch.Tensor, path: Path) -> tuple[str, str, torch.Tensor]:
    module = key[: -len(".bias")].replace(".base_layer", "")
    p = _bias_param(model, module)
    if p is None:
        raise AdapterError(f"{path}: bias {key} has no matching parameter in {type(model).__name__}")
    if p.shape != t.shape:
        raise AdapterError(f"{path}: bias {key} has shape {tuple(t.shape)}, model has {tuple(p.shape)}")
    return module, "bias", t


def _bias_param(model: nn.Module, module: str) -> torch.Tensor | None:
    try:
        m = model.get_submodule(module)
    except AttributeError:
        return None
    bias = getattr(getattr(m, "base_layer", m), "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def _describe_lora(path: Path, raw: dict[str, Any]) -> dict[str, Any]:
    config, tensors = read_adapter(path)
    suffixes = _suffixes(variant_class(config).create(config, ""))
    rows: dict[str, dict[str, Any]] = {}
    owners = [t.rpartition(".")[0] for t in config.target_parameters or []]
    params: dict[str, dict[str, Any]] = {}  # target_parameters: owner path (PEFT's nesting) -> factor shapes
    for key, t in tensors.items():
        split = _split_key(key, suffixes)
        if split is not None:
            bare = split[0].replace(".base_layer", "")
            where = params if any(bare == o or bare.endswith("." + o) for o in owners if o) else rows
            where.setdefault(split[0], {})[split[1]] = tuple(t.shape)
    saved = {
        m: {k: tuple(t.shape) for k, t in found.items()}
        for m, found in saved_tensors(config, tensors).items()
    }
    return {
        "config": config,
        "modules": rows,
        "saved": saved,
        "tokens": {m: tuple(t.shape) for m, t in token_tensors(tensors).items()},
        "params": params,
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors.values()),
    }


apply_lora_plan = _apply_lora
"""Apply a plan from `plan_lora_tensors` (or the LORA format's own): inject, copy, all or nothing."""

register_format(
    AdapterFormat(
        peft_type=DEFAULT,
        label="LoRA",
        plan=_plan_lora,
        apply=_apply_lora,
        owns=lambda model, name: True,
        save=save_lora,
        describe=_describe_lora,
        state_dict=_lora_state_dict,
    )
)
