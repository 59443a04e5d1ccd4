"""Adapter files in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

Tensor keys drop the adapter name: `base_model.model.<module>.lora_A.weight` (r, in), `...lora_B.weight` (out, r);
Embedding targets use `lora_embedding_A` (r, vocab) and `lora_embedding_B` (dim, r); DoRA adds
`lora_magnitude_vector`. Scaling is never stored. Writes are atomic; pickled files are refused by default.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lorakit.atomic import atomic_dir
from lorakit.config import LoraConfig
from lorakit.errors import AdapterError, AdapterFileError, ConfigError, TargetError
from lorakit.inject import check_new_name, delete_adapter, inject, lora_layers, registry
from lorakit.layers import Handler, handler_for
from lorakit.readers import load_weights_only, read_json, read_safetensors
from lorakit.targeting import select_modules

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
_SUFFIXES = {
    "lora_A.weight": "lora_A",
    "lora_B.weight": "lora_B",
    "lora_embedding_A": "lora_A",
    "lora_embedding_B": "lora_B",
    "lora_magnitude_vector": "magnitude",
}


def tensor_key(module: str, handler: Handler, param: str) -> str:
    """The file key of adapter parameter `param` ('lora_A', 'lora_B', 'magnitude') of `module`."""
    if param == "magnitude":
        return f"{PREFIX}{module}.lora_magnitude_vector"
    if handler.embedding:
        return f"{PREFIX}{module}.lora_embedding_{param[-1]}"
    return f"{PREFIX}{module}.{param}.weight"


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors PEFT saves for adapter `name` (keys without the adapter name), detached copies."""
    info = registry(model).adapters.get(name)
    if info is None:
        raise AdapterError(
            f"no adapter {name!r} on {type(model).__name__}; adapters: {list(registry(model).adapters)}"
        )
    if _is_adalora(model, name):
        from lorakit.variants.adalora_io import adalora_state_dict

        return adalora_state_dict(model, name)
    out: dict[str, torch.Tensor] = {}
    for mname, layer in lora_layers(model):
        if name not in layer.adapters:
            continue
        adapter = layer.adapters[name]
        for param in ("lora_A", "lora_B", "magnitude"):
            t = getattr(adapter, param)
            if t is not None:
                out[tensor_key(mname, layer.handler, param)] = t.detach().clone().contiguous()
    if info.config.bias == "all":
        for pname, p in model.named_parameters():
            if pname == "bias" or pname.endswith(".bias"):
                out[PREFIX + pname] = p.detach().clone().contiguous()
    elif info.config.bias == "lora_only":
        for mname in info.modules:
            bias = getattr(model.get_submodule(mname).base_layer, "bias", None)
            if bias is not None:
                out[f"{PREFIX}{mname}.base_layer.bias"] = bias.detach().clone().contiguous()
    return out


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter `name` as a PEFT folder at `path`, atomically: a crash leaves any previous folder intact."""
    info = registry(model).adapters.get(name)
    if info is not None and _is_adalora(model, name):  # PEFT's ADALORA layout (lora_E, rank_pattern)
        from lorakit.variants.adalora_io import save_adalora

        return save_adalora(model, path, name)
    tensors = adapter_state_dict(model, name)
    config = info.config.replace(targets=_targets_for_file(model, info.config, info.modules))
    if config.targets != info.config.targets and isinstance(config.targets, str):
        config = config.replace(layers=None, layers_pattern=None)
    if config.base_model is None:
        config = config.replace(
            base_model=getattr(getattr(model, "config", None), "_name_or_path", None) or None
        )
    if config.task_type is None:
        config = config.replace(task_type=task_type_for(model))

    from lorakit.quant import adapter_metadata
    from lorakit.variants import variant_metadata

    # + the quantized base it was trained on, and variant records (DyLoRA), if any
    metadata = {"format": "pt", **adapter_metadata(model), **variant_metadata(model, name)}

    peft_dict = config.to_peft_dict()
    heads = _heads(model, config.task_type)
    if heads:  # PEFT's classification wrappers load the head from the file: the model's own, unchanged
        peft_dict["modules_to_save"] = sorted(heads)
        for h, module in heads.items():
            for pname, p in module.named_parameters():
                tensors[f"{PREFIX}{h}.{pname}"] = p.detach().clone().contiguous()

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=metadata)
        (tmp / CONFIG_NAME).write_text(json.dumps(peft_dict, indent=2, sort_keys=True) + "\n")

    path = Path(path)
    atomic_dir(path, write, keep_others=True)
    log.info("saved adapter %r (%d tensors) to %s", name, len(tensors), path)
    return path


# transformers' head-class suffixes -> PEFT task types (PeftModel.from_pretrained builds its wrapper by these)
_TASK_SUFFIXES = {
    "ForCausalLM": "CAUSAL_LM",
    "LMHeadModel": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
    "ForSeq2SeqLM": "SEQ_2_SEQ_LM",
}


# the heads PEFT adds to modules_to_save for each classification task type (and expects in the file)
_HEAD_NAMES = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def _heads(model: nn.Module, task_type: str | None) -> dict[str, nn.Module]:
    """The task's head modules that `model` has, by name (top-level names, as PEFT matches them)."""
    return {
        n: m
        for n in _HEAD_NAMES.get(task_type or "", ())
        if isinstance(m := getattr(model, n, None), nn.Module)
    }


def task_type_for(model: nn.Module) -> str | None:
    """The PEFT task_type that fits `model`, so that PEFT wraps it in the right class when loading the adapter.

    None (PEFT's default, the plain PeftModel) for a bare encoder/decoder or anything else: PEFT's CAUSAL_LM
    wrapper needs `prepare_inputs_for_generation`, which e.g. BertModel lacks."""
    name = type(model).__name__
    # ...ForConditionalGeneration: T5 and BART are seq2seq; multimodal decoders generate like an LM
    if name.endswith("ForConditionalGeneration"):
        encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
        return "SEQ_2_SEQ_LM" if encoder_decoder else "CAUSAL_LM"
    for suffix, task in _TASK_SUFFIXES.items():
        if name.endswith(suffix):
            return task
    return None


def read_adapter(
    path: str | os.PathLike, *, allow_pickle: bool = False
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read and validate an adapter folder: (config, tensors). Raises AdapterFileError / ConfigError with the file named."""
    raw = read_config_json(path)
    cfg_file = Path(path) / CONFIG_NAME
    if _is_adalora_file(raw):
        raise AdapterFileError(
            f"{cfg_file}: an AdaLoRA adapter (peft_type ADALORA), not plain LoRA; this reads LoRA files only "
            "(lorakit.load_adapter loads AdaLoRA adapters onto a model)"
        )
    config = LoraConfig.from_peft_dict(raw, source=str(cfg_file))
    return config, _read_tensors(Path(path), allow_pickle)


def read_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed adapter_config.json of an adapter folder (any peft_type)."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterFileError(f"{path}: not an adapter folder (expected a directory with {CONFIG_NAME})")
    cfg_file = path / CONFIG_NAME
    raw = read_json(cfg_file)
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{cfg_file}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _is_adalora_file(raw: dict[str, Any]) -> bool:
    return str(raw.get("peft_type", "")).upper() == "ADALORA"


def _is_adalora(model: nn.Module, name: str) -> bool:
    """Whether adapter `name` on `model` is an AdaLoRA adapter (lorakit.variants.adalora)."""
    for _, layer in lora_layers(model):
        if name in layer.adapters:
            return layer.adapters[name].variant.name == "adalora"
    return False


def _read_tensors(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The adapter folder's tensors, each a floating-point tensor of finite values (else AdapterFileError)."""
    tensors = _read_tensor_file(path, allow_pickle)
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise AdapterFileError(f"{path}: {key} has dtype {t.dtype}, not a floating-point type")
        if not bool(torch.isfinite(t).all()):
            raise AdapterFileError(f"{path}: {key} has non-finite values (nan or inf)")
    return tensors


def _read_tensor_file(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    st, pt = path / WEIGHTS_NAME, path / PICKLE_NAME
    if st.exists():
        return read_safetensors(st)
    if pt.exists():
        if not allow_pickle:
            raise AdapterFileError(
                f"{pt}: pickled adapter refused (pickle can run code); pass allow_pickle=True / --allow-pickle to load "
                "it with torch.load(weights_only=True), or convert it to safetensors"
            )
        tensors = load_weights_only(pt)
        if not isinstance(tensors, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
        ):
            raise AdapterFileError(f"{pt}: expected a dict of tensors")
        return tensors
    raise AdapterFileError(f"{path}: no {WEIGHTS_NAME} (or {PICKLE_NAME})")


def check_adapter(model: nn.Module, path: str | os.PathLike, *, allow_pickle: bool = False) -> None:
    """Raise the error `load_adapter` would raise for this file on this model, without changing the model."""
    if _is_adalora_file(read_config_json(path)):
        from lorakit.variants.adalora_io import plan_load

        plan_load(model, read_config_json(path), _read_tensors(Path(path), allow_pickle), Path(path))
        return
    config, tensors = read_adapter(path, allow_pickle=allow_pickle)
    _plan_load(model, config, tensors, Path(path))


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    name: str | None = None,
    *,
    allow_pickle: bool = False,
    activate: bool = True,
    trainable: bool = False,
) -> str:
    """Load a PEFT-layout adapter into `model` (injecting wrappers as needed). Returns the adapter name.

    Everything is checked before the model changes: on any error the model is left exactly as it was.
    A ladder folder (peft_type LADDER) attaches its side network instead and returns "ladder".
    """
    from lorakit.variants.ladder import is_ladder_folder, load_ladder

    if is_ladder_folder(path):
        return load_ladder(model, path, trainable=trainable)
    name = name or "default"
    check_new_name(model, name)
    raw = read_config_json(path)
    if _is_adalora_file(raw):  # PEFT's ADALORA layout: SVD triplets and a rank pattern
        from lorakit.variants.adalora_io import load_adalora

        return load_adalora(
            model, path, raw, name, allow_pickle=allow_pickle, activate=activate, trainable=trainable
        )
    config, tensors = read_adapter(path, allow_pickle=allow_pickle)
    plan = _plan_load(model, config, tensors, Path(path))
    inject(model, config, name, activate=False, trainable=trainable)
    try:
        with torch.no_grad():
            for module, param, tensor in plan:
                if param == "bias":
                    target = _bias_param(model, module)
                else:
                    target = getattr(model.get_submodule(module).adapters[name], param)
                target.copy_(tensor.to(target.dtype))
        from lorakit.variants import restore_variants

        restore_variants(model, name, Path(path))  # e.g. a DyLoRA adapter gets its variant back (set_rank)
    except Exception:
        delete_adapter(model, name)
        raise
    return finish_load(model, path, name, activate)


def finish_load(model: nn.Module, path: str | os.PathLike, name: str, activate: bool) -> str:
    """After an adapter's tensors are in place: note a quantized-base mismatch, activate if asked; returns name."""
    from lorakit.quant import note_adapter_base

    note_adapter_base(model, path)
    if activate:
        from lorakit.control import set_active

        set_active(model, name)
    return name


def _plan_load(
    model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor], path: Path
) -> list[tuple[str, str, torch.Tensor]]:
    """Match file tensors to modules and check every shape. Returns (module, param, tensor) to copy."""
    try:
        modules = select_modules(model, config)
    except TargetError as e:
        raise AdapterError(f"{path}: adapter does not fit {type(model).__name__}: {e}") from None
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    biases: list[tuple[str, str, torch.Tensor]] = []
    params = dict(model.named_parameters())
    for key, t in tensors.items():
        k = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        for suffix, param in _SUFFIXES.items():
            if k.endswith("." + suffix):
                by_module.setdefault(k[: -len(suffix) - 1], {})[param] = t
                break
        else:
            if k.endswith(".bias") and config.bias != "none":
                biases.append(_plan_bias(model, k, t, path))
            elif k in params:  # a copy of a model weight (PEFT's modules_to_save, e.g. a classifier head)
                _check_copy(model, key, k, t, params[k], path)
            else:
                log.warning("%s: ignoring tensor %s (not a LoRA weight)", path, key)
    stray = sorted(set(by_module) - set(modules))
    if stray:
        raise AdapterError(
            f"{path}: tensors for modules the config does not select in {type(model).__name__}: {stray[:3]}"
        )
    plan: list[tuple[str, str, torch.Tensor]] = []
    for m in modules:
        plan += _plan_module(model, config, m, by_module.get(m, {}), path)
    return plan + biases


def _plan_module(
    model: nn.Module, config: LoraConfig, m: str, found: dict[str, torch.Tensor], path: Path
) -> list[tuple[str, str, torch.Tensor]]:
    module = model.get_submodule(m)
    handler = handler_for(module)
    base = getattr(module, "base_layer", module)
    a_shape, b_shape = handler.shapes(base, config.rank_for(m))
    expected = {"lora_A": a_shape, "lora_B": b_shape}
    if config.use_dora:
        expected["magnitude"] = handler.magnitude_shape(handler.dims(base)[0])
    out = []
    for param, shape in expected.items():
        t = found.get(param)
        if t is None:
            raise AdapterError(f"{path}: missing tensor {tensor_key(m, handler, param)}")
        if tuple(t.shape) != tuple(shape):
            raise AdapterError(
                f"{path}: {m}.{param} has shape {tuple(t.shape)} but {type(base).__name__} "
                f"{tuple(handler.weight(base).shape)} with r={config.rank_for(m)} needs {tuple(shape)}"
            )
        out.append((m, param, t))
    return out


def _check_copy(model: nn.Module, key: str, name: str, t: torch.Tensor, p: torch.Tensor, path: Path) -> None:
    """A file tensor that copies model weight `name` (PEFT's modules_to_save) must equal it: lorakit keeps no
    trained copies of whole modules, and silently using the model's own instead would change the adapter."""
    if t.shape != p.shape or not torch.equal(t.to(p.dtype), p.detach().cpu()):
        raise AdapterError(
            f"{path}: {key} is a trained copy of {type(model).__name__}.{name} (PEFT modules_to_save), which "
            "lorakit does not load (only LoRA weights); its values differ from the model's own"
        )


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


def _targets_for_file(model: nn.Module, config: LoraConfig, modules: list[str]) -> str | list[str]:
    """A `target_modules` value that re-selects exactly `modules` on this model (PEFT's rules)."""
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    for candidate in (leaves, config.targets):
        if candidate == "all-linear":
            continue
        try:
            if select_modules(model, config.replace(targets=candidate)) == modules:
                return candidate
        except (TargetError, ConfigError):
            pass
    return "(" + "|".join(re.escape(m) for m in modules) + ")"


def describe_adapter(path: str | os.PathLike) -> dict[str, Any]:
    """Config and per-module shapes of an adapter folder, without a model (a ladder folder: its description)."""
    from lorakit.variants.ladder import describe_ladder, is_ladder_folder

    if is_ladder_folder(path):
        return describe_ladder(path)
    config, tensors = read_adapter(path)
    rows: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        k = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        for suffix, param in _SUFFIXES.items():
            if k.endswith("." + suffix):
                rows.setdefault(k[: -len(suffix) - 1], {})[param] = tuple(t.shape)
    return {
        "config": config,
        "modules": rows,
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors.values()),
    }
