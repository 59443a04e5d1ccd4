"""AdaLoRA adapter files in PEFT's ADALORA layout, written and read by `lorakit.save_adapter` / `load_adapter`.

`adapter_config.json` has peft_type "ADALORA", PEFT's LoRA keys (targets, lora_alpha, dropout, ...), the schedule
(init_r, target_r, tinit, tfinal, deltaT, beta1, beta2, orth_reg_weight, total_step) and `rank_pattern`:
"<module>.lora_E" -> one bool per initial rank row, True where the triplet was kept. Tensors (no ".weight"):
`base_model.model.<module>.lora_A` (r, in), `.lora_E` (r, 1), `.lora_B` (out, r). As PEFT does, only the kept
rows are saved (r = the number of True values; 0 is possible), and the scaling stays alpha / (init_r + 1e-5).
Modules saved whole (`modules_to_save`: a classifier's or reward model's head) are keyed as in a LoRA file.

Registered in lorakit.formats as the format of peft_type "ADALORA": `save_adapter`, `load_adapter`,
`check_adapter` and `describe_adapter` hand such folders and adapters over to the hooks here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import AdapterError, ConfigError, TargetError
from lorakit.formats import (
    CONFIG_NAME,
    PREFIX,
    AdapterFormat,
    file_config,
    file_metadata,
    read_tensors,
    register_format,
    write_folder,
)
from lorakit.handlers import handler_for
from lorakit.inject import check_new_name, delete_adapter
from lorakit.lora_format import read_adapter
from lorakit.registry import adapter_layers, lora_layers, registry
from lorakit.saved import copies_of
from lorakit.saved_plan import plan_saved
from lorakit.targeting import select_modules
from lorakit.variants.adalora import (
    ADALORA_KEYS,
    TENSORS,
    AdaLoraConfig,
    AdaLoraVariant,
    adalora_config,
    check_lora_for_adalora,
    inject_adalora,
)

log = logging.getLogger(__name__)

PARAMS = tuple(TENSORS)  # the variant's tensors: lora_A, lora_E, lora_B


def _keep(config: AdaLoraConfig, module: str) -> list[bool] | None:
    pattern = config.rank_pattern or {}
    return pattern.get(f"{module}.lora_E")


def adalora_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors PEFT saves for AdaLoRA adapter `name`: the kept rows of A, E and B of every layer."""
    config = adalora_config(model, name)
    out: dict[str, torch.Tensor] = {}
    for m, layer in lora_layers(model):
        if name not in layer.adapters:
            continue
        a = layer.adapters[name]
        A, B, E = a.lora_A.detach(), a.lora_B.detach(), a.lora_E.detach()
        keep = _keep(config, m)
        if keep is not None and sum(keep) != A.shape[0]:
            idx = torch.tensor(keep, dtype=torch.bool, device=A.device)
            A, E, B = A[idx], E[idx], B[:, idx]
        for pname, t in (("lora_A", A), ("lora_B", B), ("lora_E", E)):
            out[f"{PREFIX}{m}.{pname}"] = t.clone().contiguous()
    for mname, module in copies_of(model, name).items():  # modules_to_save, keyed as PEFT saves them
        for k, t in module.state_dict().items():
            out[f"{PREFIX}{mname}.{k}"] = t.detach().clone().contiguous()
    return out


def peft_config_dict(model: nn.Module, name: str = "default") -> dict[str, Any]:
    """The adapter_config.json of AdaLoRA adapter `name`, as PEFT writes it."""
    config = adalora_config(model, name)
    d = file_config(model, registry(model).adapters[name]).to_peft_dict()
    d.update(config.to_dict())
    # PEFT's default r, which AdaLoRA ignores (init_r and rank_pattern give the shapes); another value warns
    d.update(peft_type="ADALORA", r=8, alpha_pattern={})
    saved = registry(model).adapters[name].saved
    if saved:
        d["modules_to_save"] = list(saved)
    return d


def save_adalora(model: nn.Module, path: str | Path, name: str = "default") -> Path:
    """Write AdaLoRA adapter `name` as PEFT's ADALORA folder, atomically."""
    tensors = adalora_state_dict(model, name)
    write_folder(Path(path), tensors, peft_config_dict(model, name), file_metadata(model, name))
    log.info("saved AdaLoRA adapter %r (%d tensors) to %s", name, len(tensors), path)
    return Path(path)


def parse_config(raw: dict[str, Any], source: str) -> tuple[LoraConfig, AdaLoraConfig]:
    """(LoRA settings, AdaLoRA settings) from an ADALORA adapter_config.json."""
    ada = {k: raw[k] for k in ADALORA_KEYS if raw.get(k) is not None}
    rest = {k: v for k, v in raw.items() if k not in ADALORA_KEYS and k != "r"}
    try:
        config = AdaLoraConfig(**ada)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{source}: {e}") from None
    pattern = config.rank_pattern
    if pattern is not None and (
        not isinstance(pattern, dict)
        or not all(isinstance(v, list) and all(isinstance(b, bool) for b in v) for v in pattern.values())
    ):
        raise ConfigError(f"{source}: rank_pattern must map '<module>.lora_E' to lists of true/false")
    rest.update(peft_type="LORA", r=config.init_r)
    lora = LoraConfig.from_peft_dict(rest, source=source)
    return lora, config


def _module_of(key: str) -> str:
    """'<module>.lora_E' or '<module>.lora_E.<adapter>' (an untruncated PEFT key) -> '<module>'."""
    head, sep, _ = key.rpartition(".lora_E")
    return head if sep else key


def plan_load(
    model: nn.Module, raw: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path
) -> tuple[
    LoraConfig,
    AdaLoraConfig,
    dict[str, int],
    list[tuple[str, str, torch.Tensor]],
    list[tuple[str, str, torch.Tensor]],
]:
    """Check the file against the model without changing it: (lora, config, ranks, (module, param, tensor) of
    the triplets, (module, key, tensor) of the modules saved whole)."""
    lora, config = parse_config(raw, str(path / CONFIG_NAME))
    try:
        check_lora_for_adalora(lora)
    except ConfigError as e:
        raise ConfigError(f"{path / CONFIG_NAME}: {e}") from None
    lora, saved, tensors = plan_saved(model, lora, tensors, path)  # a classifier's head, saved whole
    try:
        modules = select_modules(model, lora)
    except TargetError as e:
        raise AdapterError(f"{path}: adapter does not fit {type(model).__name__}: {e}") from None
    pattern = {_module_of(k): v for k, v in (config.rank_pattern or {}).items()}
    config.rank_pattern = {f"{m}.lora_E": v for m, v in pattern.items()} if config.rank_pattern else None
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        k = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        module, _, param = k.rpartition(".")
        if param in PARAMS:
            found.setdefault(module, {})[param] = t
        else:
            log.warning("%s: ignoring tensor %s (not an AdaLoRA weight)", path, key)
    stray = sorted(set(found) - set(modules))
    if stray:
        raise AdapterError(
            f"{path}: tensors for modules the config does not select in {type(model).__name__}: {stray[:3]}"
        )
    ranks, plan = {}, []
    for m in modules:
        module = model.get_submodule(m)
        handler = handler_for(module)
        if handler is None or not handler.linear:
            raise AdapterError(f"{path}: {m} is a {type(module).__name__}; AdaLoRA adapts linear layers only")
        d, k = handler.dims(getattr(module, "base_layer", module))
        r = sum(pattern[m]) if m in pattern else config.init_r
        ranks[m] = r
        for param, shape in (("lora_A", (r, k)), ("lora_B", (d, r)), ("lora_E", (r, 1))):
            t = found.get(m, {}).get(param)
            if t is None:
                raise AdapterError(f"{path}: missing tensor {PREFIX}{m}.{param}")
            if tuple(t.shape) != shape:
                raise AdapterError(
                    f"{path}: {m}.{param} has shape {tuple(t.shape)} but {type(module).__name__} with "
                    f"r={r} (init_r={config.init_r}, rank_pattern) needs {shape}"
                )
            plan.append((m, param, t))
    return lora, config, ranks, plan, saved


@dataclass
class _Plan:
    lora: LoraConfig
    config: AdaLoraConfig
    ranks: dict[str, int]
    copies: list[tuple[str, str, torch.Tensor]]
    saved: list[tuple[str, str, torch.Tensor]]


def _plan(model: nn.Module, path: Path, raw: dict[str, Any], name: str, allow_pickle: bool) -> _Plan:
    check_new_name(model, name)
    return _Plan(*plan_load(model, raw, read_tensors(path, allow_pickle), path))


def _apply(model: nn.Module, plan: _Plan, name: str, trainable: bool) -> str:
    """Inject adapter `name` as the plan says and copy its tensors; the model is unchanged on any error."""
    inject_adalora(model, plan.lora, plan.config, name, ranks=plan.ranks, activate=False, trainable=trainable)
    try:
        with torch.no_grad():
            for module, param, tensor in plan.copies:
                target = getattr(model.get_submodule(module).adapters[name], param)
                target.copy_(tensor.to(target.dtype))
            copies = copies_of(model, name)
            for module, key, tensor in plan.saved:
                target = copies[module].state_dict()[key]
                target.copy_(tensor.to(target.dtype))
    except Exception:
        delete_adapter(model, name)
        raise
    return name


def _owns(model: nn.Module, name: str) -> bool:
    layers = adapter_layers(model, name)
    return bool(layers) and isinstance(layers[0][1].adapters[name].variant, AdaLoraVariant)


def _describe(path: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """`lorakit inspect` describes plain LoRA folders only: the same one-line refusal as `read_adapter`."""
    read_adapter(path)  # refuses every folder that is not peft_type LORA
    raise AssertionError(f"{path}: read an ADALORA folder as LoRA")


register_format(
    AdapterFormat(
        peft_type="ADALORA",
        label="AdaLoRA",
        plan=_plan,
        apply=_apply,
        owns=_owns,
        save=save_adalora,
        describe=_describe,
        state_dict=adalora_state_dict,
    )
)
