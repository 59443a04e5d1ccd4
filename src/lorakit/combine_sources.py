"""Read and check the adapters that `lorakit.combine` takes: each source's table of LoRA modules, the settings all
sources must share, and the parts the result carries unchanged (modules saved whole, trained token rows).

Every function here raises `AdapterError` naming the source (by the name combine gives it: its folder, or
"adapter i") and the module at fault; nothing here writes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from lorakit.combine_math import Lora
from lorakit.config import LoraConfig
from lorakit.errors import AdapterError
from lorakit.formats import CONFIG_NAME, PREFIX
from lorakit.layers import INIT_FACTORS
from lorakit.peft_keys import TRAINING_ONLY_TENSORS
from lorakit.saved_plan import TOKEN_KEY, saved_tensors, token_tensors
from lorakit.variants.bdlora import BdLoraVariant

log = logging.getLogger(__name__)

Source = tuple[LoraConfig, dict[str, torch.Tensor]]
_KEYS = {  # file key suffix -> (A or B, embedding?)
    "lora_A.weight": ("A", False),
    "lora_B.weight": ("B", False),
    "lora_embedding_A": ("A", True),
    "lora_embedding_B": ("B", True),
}


# Settings every combined adapter must share, as the result keeps them: why adapters that differ cannot combine
SHARED = {
    "layer_replication": "adapters on differently replicated layers cannot be combined",  # keys name other layers
    "alora_invocation_tokens": "aLoRA adapters combine only with adapters invoked by the same tokens",
    "ensure_weight_tying": "an adapter whose head is its embedding's transpose combines only with others so tied",
}


def shared_settings(configs: list[LoraConfig], names: list[str]) -> dict[str, object]:
    """The settings in `SHARED`, which every source must have alike; the result keeps them."""
    shared = {key: getattr(configs[0], key) for key in SHARED}
    for cfg, name in zip(configs, names, strict=True):
        for key, why in SHARED.items():
            if getattr(cfg, key) != shared[key]:
                raise AdapterError(f"{name}: {key}={getattr(cfg, key)}, {names[0]}'s is {shared[key]}: {why}")
    return shared


def module_table(
    config: LoraConfig, tensors: dict[str, torch.Tensor], name: str
) -> tuple[dict[str, Lora], dict[str, torch.Tensor]]:
    """(module name -> its LoRA, checked against the config (which sets each module's r and scaling); module
    name -> its bias on B, for a lora_bias adapter)."""
    if config.use_dora:
        raise AdapterError(f"{name}: DoRA adapters cannot be combined (their update is not s·B·A)")
    if config.init in INIT_FACTORS:  # PiSSA, OLoRA: B·A is relative to W0 - s·B0·A0
        raise AdapterError(
            f"{name}: {config.init} adapters are relative to a modified base weight; convert to plain LoRA first "
            "(lorakit.load_adapter, then save_adapter)"
        )
    if config.target_parameters:
        raise AdapterError(
            f"{name}: adapts parameters (target_parameters {config.target_parameters}), which combine does not "
            "support (PEFT's add_weighted_adapter refuses them too)"
        )
    if config.use_kasa:
        raise AdapterError(
            f"{name}: a KaSA adapter (kasa_config) changes W0 by its SVD, which combine, reading adapter files "
            "alone, does not have; merge it into the model instead"
        )
    if config.bias != "none":
        raise AdapterError(
            f"{name}: bias={config.bias!r} adapters carry trained base biases, which cannot be combined"
        )
    found: dict[str, dict[str, tuple[torch.Tensor, bool]]] = {}
    biases: dict[str, torch.Tensor] = {}
    whole = {f"{m}.{k}" for m, part in saved_tensors(config, tensors).items() for k in part}
    for key, t in tensors.items():
        k = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        if k in whole or k.endswith("." + TOKEN_KEY):  # carried by carry_saved / carry_tokens
            continue
        if any(part in k for part in TRAINING_ONLY_TENSORS):  # VeLoRA's, MonteCLoRA's training state
            continue
        if config.lora_bias and k.endswith(".lora_B.bias"):
            biases[k[: -len(".lora_B.bias")]] = t
            continue
        for suffix, (param, embedding) in _KEYS.items():
            if k.endswith("." + suffix):
                found.setdefault(k[: -len(suffix) - 1], {})[param] = (t, embedding)
                break
        else:
            log.warning("%s: ignoring tensor %s (not a LoRA A or B weight)", name, key)
    if not found:
        raise AdapterError(f"{name}: no LoRA tensors (lora_A / lora_B) in the adapter")
    table = {}
    for m, parts in sorted(found.items()):
        if len(parts) != 2:
            have = next(iter(parts))
            raise AdapterError(f"{name}: {m} has lora_{have} but no lora_{'B' if have == 'A' else 'A'}")
        (A, emb_a), (B, emb_b) = parts["A"], parts["B"]
        # BD-LoRA: the stored blocks as the dense factor they stand for; the result is plain LoRA
        if config.use_bdlora:
            A, B = BdLoraVariant.create(config, m).dense(A, B)
        if (
            emb_a != emb_b
            or A.dim() < 2
            or B.dim() != A.dim()
            or B.shape[1] != A.shape[0]
            or any(s != 1 for s in B.shape[2:])
        ):
            raise AdapterError(
                f"{name}: {m} has inconsistent LoRA tensors A {tuple(A.shape)} and B {tuple(B.shape)}"
            )
        if A.shape[0] != config.rank_for(m):
            raise AdapterError(
                f"{name}: {m} has rank {A.shape[0]} in its tensors but r={config.rank_for(m)} in {CONFIG_NAME}"
            )
        table[m] = Lora(A, B, config.scaling_for(m), emb_a)
    for m, b in biases.items():
        lora = table.get(m)
        if lora is None or b.shape != (lora.shape[0],):
            have = f"shape {tuple(b.shape)}" if lora is not None else "no lora_A / lora_B beside it"
            raise AdapterError(f"{name}: {m}.lora_B.bias has {have}; expected one value per output feature")
    if config.lora_bias and set(biases) != set(table):
        m = sorted(set(table) - set(biases))[0]
        raise AdapterError(f"{name}: {m} has no lora_B.bias although {CONFIG_NAME} sets lora_bias")
    return table, biases


def check_base_models(configs: list[LoraConfig], names: list[str], ignore: bool) -> None:
    """Every source that names its base model names the same one (trailing slashes aside), unless `ignore`."""
    first = configs[0].base_model
    for cfg, name in zip(configs, names, strict=True):
        if ignore or cfg.base_model is None:
            continue
        if first is None:
            first = cfg.base_model
        elif cfg.base_model.rstrip("/") != first.rstrip("/"):
            raise AdapterError(
                f"{name}: made for base model {cfg.base_model!r}, another adapter for {first!r}; "
                "pass ignore_base_model=True (--ignore-base-model) if they are the same model"
            )


def check_modules(tables: list[dict[str, Lora]], names: list[str], allow_missing: bool) -> list[str]:
    """The modules to combine (sorted); every source's LoRA on a module must have the same ΔW shape."""
    modules = sorted(set().union(*tables))
    for m in modules:
        present = [(name, table[m]) for name, table in zip(names, tables, strict=True) if m in table]
        if len(present) < len(tables) and not allow_missing:
            lacking = next(name for name, table in zip(names, tables, strict=True) if m not in table)
            raise AdapterError(
                f"{lacking}: has no LoRA on {m}, which {present[0][0]} adapts; the adapters target different "
                "modules (pass allow_missing=True / --allow-missing to count a missing module as ΔW = 0)"
            )
        name0, first = present[0]
        for name, lora in present[1:]:
            if lora.shape != first.shape or lora.embedding != first.embedding:
                raise AdapterError(
                    f"{m}: ΔW is {_kind(first)} {first.shape} in {name0} but {_kind(lora)} {lora.shape} in "
                    f"{name}; are the adapters for the same base model?"
                )
    return modules


def _kind(lora: Lora) -> str:
    return "an embedding" if lora.embedding else "a weight"


def carry_tokens(
    sources: Sequence[Source], weights: list[float], names: list[str]
) -> tuple[dict[str, torch.Tensor], list[int] | dict[str, list[int]] | None]:
    """The token rows (trainable_token_indices) the result carries, each module's from the one source that has
    rows there, and the config value that names them."""
    owner: dict[str, str] = {}
    rows: dict[str, torch.Tensor] = {}
    ids: dict[str, list[int]] = {}
    value = None
    for (cfg, tensors), w, name in zip(sources, weights, names, strict=True):
        for m, t in token_tensors(tensors).items():
            if m in owner:
                raise AdapterError(
                    f"{name}: trains token rows of {m!r} (trainable_token_indices), and so does {owner[m]}; two "
                    "sets of trained rows of one embedding cannot be combined"
                )
            if w != 1.0:
                raise AdapterError(
                    f"{name}: trains token rows of {m!r} (trainable_token_indices), which are carried unchanged "
                    f"and cannot be weighted; give this adapter weight 1, not {w:g}"
                )
            spec = cfg.trainable_token_indices
            mine = (
                spec if isinstance(spec, list) else next(v for k, v in (spec or {}).items() if m.endswith(k))
            )
            owner[m], rows[m], ids[m] = name, t, list(mine)
            value = list(mine) if isinstance(spec, list) else None
    if not rows:
        return rows, None
    return rows, value if value is not None and len(rows) == 1 else ids


def carry_saved(
    sources: Sequence[Source], weights: list[float], names: list[str]
) -> dict[str, dict[str, torch.Tensor]]:
    """The modules saved whole that the result carries: each from the one source that saves it."""
    owner: dict[str, str] = {}
    out: dict[str, dict[str, torch.Tensor]] = {}
    for (cfg, tensors), w, name in zip(sources, weights, names, strict=True):
        for m, found in saved_tensors(cfg, tensors).items():
            if m in owner:
                raise AdapterError(
                    f"{name}: saves {m!r} whole (modules_to_save), and so does {owner[m]}; two trained copies of "
                    "one module cannot be combined (combine adapters that save it in at most one)"
                )
            if w != 1.0:
                raise AdapterError(
                    f"{name}: saves {m!r} whole (modules_to_save), which is carried unchanged and cannot be "
                    f"weighted; give this adapter weight 1, not {w:g}"
                )
            owner[m], out[m] = name, found
    return out
