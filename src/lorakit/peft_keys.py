"""PEFT's `adapter_config.json` keys and values <-> `LoraConfig`'s fields (`LoraConfig.to_peft_dict`,
`LoraConfig.from_peft_dict`): which keys map to which field, which are ignored, which name features lorakit
refuses in one line, and the init names.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

from lorakit.checks import short
from lorakit.errors import ConfigError

ALL_LINEAR = "all-linear"
"""PEFT's shorthand for every linear layer but the output head (and lorakit's, `config.ALL_LINEAR`)."""

# PEFT's `init_lora_weights` values <-> ours.
_INIT_TO_PEFT: dict[str, Any] = {
    "default": True,
    "gaussian": "gaussian",
    "pissa": "pissa",
    "olora": "olora",
    "orthogonal": "orthogonal",
    "loftq": "loftq",
    "eva": "eva",
    "corda": "corda",
    "lora_ga": "lora_ga",
    "mica": "mica",
    "random": False,
}

# PEFT LoRA keys that carry no numerics we need, accepted whatever their value.
_PEFT_IGNORED_KEYS = {
    "auto_mapping",
    "revision",
    "inference_mode",
    "megatron_config",
    "megatron_core",
    "runtime_config",
    "peft_version",
    "fan_in_fan_out",
    "base_model_name_or_path",
    "task_type",
    "lora_dropout",
    "corda_config",  # PEFT ignores it unless init_lora_weights is "corda", which is refused (from_peft_dict)
    "lora_ga_config",  # the same, for "lora_ga"
    "astra_config",  # the same, for "astra" (peft 0.22), an init lorakit refuses
    "modules_to_tie",  # PEFT's own record of the tied modules it found; it finds them again at load, as lorakit does
    "target_modules_to_tie",
}
# PEFT keys for features we do not implement: fine when unset (None/False/empty), an error otherwise.
_PEFT_UNSUPPORTED_KEYS = {
    "use_qalora",
    "qalora_group_size",
    "loftq_config",
    "bdlora_config",
    "arrow_config",
    "use_mica",
}
# PEFT keys for features that change training only: at inference their adapter is plain LoRA (VeLoRA compresses
# the activations A's backward keeps; MonteCLoRA samples A's noise in training, eval mode uses A itself)
_PEFT_TRAINING_ONLY = {"velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA"}
TRAINING_ONLY_TENSORS = (".lora_velora_embed", ".lora_monteclora_sampler.")
"""Key parts of those features' training state in PEFT's files, which a load passes over."""


# PEFT's adapter_config.json keys -> LoraConfig fields, and back (for messages that name the file's key)
_FROM_PEFT: dict[str, str] = {
    "r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target_modules": "targets",
    "exclude_modules": "exclude",
    "layers_to_transform": "layers",
    "layers_pattern": "layers_pattern",
    "rank_pattern": "rank_pattern",
    "alpha_pattern": "alpha_pattern",
    "bias": "bias",
    "lora_bias": "lora_bias",
    "use_rslora": "use_rslora",
    "use_dora": "use_dora",
    "task_type": "task_type",
    "base_model_name_or_path": "base_model",
    "modules_to_save": "modules_to_save",
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "target_parameters",
    "layer_replication": "layer_replication",
    "alora_invocation_tokens": "alora_invocation_tokens",
    "ensure_weight_tying": "ensure_weight_tying",
    "use_bdlora": "use_bdlora",
}
_PEFT_KEY = {ours: theirs for theirs, ours in _FROM_PEFT.items()}
# PEFT's eva_config keys -> LoraConfig fields (label_mask_value: lorakit's labels mask with -100, as PEFT's default)
_EVA_FROM_PEFT = {
    "rho": "eva_rho",
    "tau": "eva_tau",
    "use_label_mask": "eva_label_mask",
    "whiten": "eva_whiten",
    "adjust_scaling_factors": "eva_adjust_scaling",
}
_PEFT_KEY.update({ours: f"eva_config.{theirs}" for theirs, ours in _EVA_FROM_PEFT.items()})
# PEFT's kasa_config keys -> LoraConfig fields (a kasa_config, even {}, turns KaSA on: use_kasa)
_KASA_FROM_PEFT = {"beta": "kasa_beta", "gamma": "kasa_gamma"}
_PEFT_KEY.update({ours: f"kasa_config.{theirs}" for theirs, ours in _KASA_FROM_PEFT.items()})
_PEFT_KEY["use_kasa"] = "kasa_config"
_PEFT_KEY["init"] = "init_lora_weights"

def peft_key(field: str | None) -> str | None:
    """The file's name for LoraConfig field `field` (lora_alpha for alpha, eva_config.rho for eva_rho), or
    `field` itself."""
    return _PEFT_KEY.get(field or "", field)


def peft_fields(config) -> dict[str, Any]:
    """The `adapter_config.json` content PEFT expects for LoraConfig `config`."""
    fields = {theirs: getattr(config, ours) for theirs, ours in _FROM_PEFT.items()}
    fields.update(rank_pattern=dict(config.rank_pattern), alpha_pattern=dict(config.alpha_pattern))
    if config.init == "eva":
        fields["eva_config"] = {
            "rho": config.eva_rho,
            "tau": config.eva_tau,
            "use_label_mask": config.eva_label_mask,
            "label_mask_value": -100,
            "whiten": config.eva_whiten,
            "adjust_scaling_factors": config.eva_adjust_scaling,
        }
    if config.use_kasa:
        fields["kasa_config"] = {theirs: getattr(config, ours) for theirs, ours in _KASA_FROM_PEFT.items()}
    if config.init == "corda":  # what PEFT's get_peft_model takes; lorakit's files of it are plain LoRA
        fields["corda_config"] = {"corda_method": config.corda_mode}
    if config.init == "lora_ga":  # the same
        fields["lora_ga_config"] = {
            "direction": config.lora_ga_direction,
            "scale": config.lora_ga_scale,
            "stable_gamma": config.lora_ga_stable_gamma,
        }
    return {
        "peft_type": "LORA",
        **fields,
        # LoftQ's work is in the trained weights; "loftq" here would make PEFT re-run it at load (on CUDA)
        "init_lora_weights": True if config.init == "loftq" else _INIT_TO_PEFT[config.init],
        **({"init_lora_weights": f"pissa_niter_{config.pissa_niter}"} if config.pissa_niter else {}),
        "fan_in_fan_out": False,
        "inference_mode": True,
    }


def config_kwargs(d: dict[str, Any], source: str) -> dict[str, Any]:
    """LoraConfig's keyword arguments from PEFT's `adapter_config.json` content `d` (named `source` in messages).
    Unknown keys warn; missing required keys, refused values and unsupported features raise ConfigError."""
    peft_type = d.get("peft_type")
    if peft_type is None:
        raise ConfigError(f"{source}: missing required key 'peft_type'")
    if str(peft_type).upper() != "LORA":
        raise ConfigError(f"{source}: unsupported peft_type {peft_type!r} (lorakit loads LORA adapters)")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in d:
            raise ConfigError(f"{source}: missing required key {key!r}")
    data_init = {"corda": "CorDA", "lora_ga": "LoRA-GA"}.get(str(d.get("init_lora_weights")))
    if data_init:
        raise ConfigError(
            f"{source}: init_lora_weights={d['init_lora_weights']!r}: the adapter is relative to base weights "
            f"that {data_init} changed using data, which a load cannot compute again; save it from PEFT with "
            "path_initial_model_for_weight_conversion (plain LoRA on the original base)",
            key="init_lora_weights",
        )
    kwargs: dict[str, Any] = {}
    for key, value in d.items():
        if key in _FROM_PEFT:
            if value is not None or key in ("task_type", "base_model_name_or_path", "exclude_modules"):
                kwargs[_FROM_PEFT[key]] = value
        elif key == "init_lora_weights":
            niter = re.fullmatch(r"pissa_niter_(\d+)", value) if isinstance(value, str) else None
            if niter:  # PiSSA by a randomised SVD
                kwargs["init"], kwargs["pissa_niter"] = "pissa", int(niter[1])
            else:
                kwargs["init"] = _init_from_peft(value, source)
        elif key == "loftq_config" and value:
            if not isinstance(value, dict) or value.get("loftq_bits", 4) != 4:
                raise ConfigError(f"{source}: loftq_config={value!r}: lorakit's LoftQ is for 4-bit (NF4) bases")
            kwargs["loftq_iter"] = value.get("loftq_iter", 1)
        elif key == "eva_config":  # PEFT writes null when EVA is not used
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: eva_config must be a mapping, got {short(value)}", key=key)
            for theirs, ours in _EVA_FROM_PEFT.items():
                if theirs in value:
                    kwargs[ours] = value[theirs]
        elif key == "kasa_config":  # PEFT writes null when KaSA is not used
            if value is None:
                continue
            if not isinstance(value, dict) or not set(value) <= set(_KASA_FROM_PEFT):
                raise ConfigError(
                    f"{source}: kasa_config must be a mapping with keys beta and gamma, got {short(value)}", key=key
                )
            kwargs["use_kasa"] = True
            kwargs.update({_KASA_FROM_PEFT[k]: v for k, v in value.items()})
        elif key in _PEFT_TRAINING_ONLY:
            if value not in (None, False, {}):
                warnings.warn(
                    f"{source}: {key}: PEFT's {_PEFT_TRAINING_ONLY[key]} changes training only, and at inference the "
                    "adapter is plain LoRA, as lorakit loads it (training it on here trains plain LoRA)",
                    stacklevel=4,
                )
        elif key == "arrow_config" and value:
            raise ConfigError(
                f"{source}: arrow_config: a PEFT Arrow router is no adapter of its own; load its task adapters and "
                "route between them with lorakit.arrow (lorakit generate --adapter ... --arrow K)",
                key=key,
            )
        elif key in _PEFT_UNSUPPORTED_KEYS:
            if value not in (None, False, {}, [], "", 0) and not (key == "qalora_group_size"):
                raise ConfigError(f"{source}: {key}={value!r} is a PEFT feature lorakit does not support")
        elif key not in _PEFT_IGNORED_KEYS and key != "peft_type" and not key.startswith("lorakit_"):
            warnings.warn(f"{source}: ignoring unknown key {key!r}", stacklevel=4)
    if isinstance(kwargs.get("targets"), list) and kwargs["targets"] == [ALL_LINEAR]:
        kwargs["targets"] = ALL_LINEAR
    kwargs["rank_pattern"] = kwargs.get("rank_pattern") or {}
    kwargs["alpha_pattern"] = kwargs.get("alpha_pattern") or {}
    return kwargs


def _init_from_peft(value: Any, source: str) -> str:
    for ours, theirs in _INIT_TO_PEFT.items():
        if value == theirs and type(value) is type(theirs):
            return ours
    raise ConfigError(
        f"{source}: init_lora_weights={value!r} is not supported (use true, false, 'gaussian', 'pissa', 'olora', "
        "'pissa_niter_N', 'orthogonal', 'loftq', 'eva' or 'mica')"
    )
