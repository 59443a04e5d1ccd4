"""`LoraConfig`'s allowed values and checks: each field's type and range, then the settings that do not work together.

Every check raises `ConfigError` naming the field (its `key`), which `LoraConfig.from_peft_dict` turns into the key as
PEFT's file spells it. The functions take the config as `c` (a `LoraConfig`, which imports this module).
"""

from __future__ import annotations

import re
from typing import Any

from lorakit.checks import is_int, is_number, is_str_list, short
from lorakit.errors import ConfigError
from lorakit.peft_keys import ALL_LINEAR

BIAS_MODES = ("none", "all", "lora_only")
INITS = (
    "default",
    "gaussian",
    "pissa",
    "olora",
    "orthogonal",
    "loftq",
    "eva",
    "corda",
    "lora_ga",
    "mica",
    "random",
)
CORDA_MODES = ("ipm", "kpm")
LORA_GA_DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
LORA_GA_SCALES = ("stable", "weight_svd", "gd_scale", "unit")


def check_config(c: Any) -> None:
    """Every check on a normalised `LoraConfig`: the types first, so the combinations compare sound values."""
    _check_types(c)
    _check_combinations(c)


def _check_combinations(c: Any) -> None:
    _check(
        bool(c.targets) or bool(c.target_parameters),
        "targets must name at least one module (or be 'all-linear'), unless target_parameters names parameters",
        "targets",
    )
    if c.target_parameters:
        for bad, why in (
            (c.dropout > 0, f"dropout={c.dropout}"),
            (c.use_dora, "use_dora"),
            (c.init not in ("default", "gaussian"), f"init={c.init!r}"),
        ):
            _check(not bad, f"target_parameters does not work with {why} (as in PEFT)", "target_parameters")
    if c.alora_invocation_tokens is not None:
        for bad, why in (
            (c.use_dora, "use_dora"),
            (c.lora_bias, "lora_bias"),
            (bool(c.target_parameters), "target_parameters"),
            (c.init in ("pissa", "olora", "corda", "lora_ga", "loftq"), f"init={c.init!r}"),
        ):
            _check(
                not bad,
                f"alora_invocation_tokens does not work with {why}: the tokens before the invocation must see "
                "the base model alone",
                "alora_invocation_tokens",
            )
    if c.layer_replication:
        _check(
            c.init not in ("pissa", "olora", "corda", "lora_ga", "loftq", "eva"),
            f"layer_replication does not work with init={c.init!r}: the copies share their W0, which that "
            "init changes (once per copy), or whose inputs it reads before the layers are replicated",
            "layer_replication",
        )
        _check(
            not c.target_parameters,
            "layer_replication does not work with target_parameters (the copies share those parameters)",
            "layer_replication",
        )
    _check(c.bias in BIAS_MODES, f"bias must be one of {BIAS_MODES}, got {short(c.bias)}", "bias")
    _check(c.init in INITS, f"init must be one of {INITS}, got {short(c.init)}", "init")
    if c.lora_bias:
        for bad, why in (
            (c.use_dora, "use_dora"),
            (c.init not in ("default", "random"), f"init={c.init!r}"),
            (bool(c.target_parameters), "target_parameters"),
        ):
            _check(not bad, f"lora_bias does not work with {why} (as in PEFT)", "lora_bias")
    _check(
        not (c.init == "mica" and c.use_dora), "init='mica' does not work with use_dora (as in PEFT)", "init"
    )
    _check(
        not (c.init == "corda" and c.use_dora),
        "init='corda' does not work with use_dora (CorDA saves as plain LoRA on the original W0, whose norm DoRA's "
        "magnitude would not match)",
        "init",
    )
    _check(
        is_int(c.pissa_niter, 0),
        f"pissa_niter must be an integer >= 0, got {short(c.pissa_niter)}",
        "pissa_niter",
    )
    _check(
        not c.pissa_niter or c.init == "pissa",
        f"pissa_niter is PiSSA's (init='pissa'), not init={c.init!r}",
        "pissa_niter",
    )
    _check(
        not (c.init == "lora_ga" and c.use_dora),
        "init='lora_ga' does not work with use_dora (LoRA-GA saves as plain LoRA on the original W0, whose norm "
        "DoRA's magnitude would not match)",
        "init",
    )
    for key, allowed in (("lora_ga_direction", LORA_GA_DIRECTIONS), ("lora_ga_scale", LORA_GA_SCALES)):
        value = getattr(c, key)
        _check(value in allowed, f"{key} must be one of {allowed}, got {short(value)}", key)
    _check(
        is_number(c.lora_ga_stable_gamma) and c.lora_ga_stable_gamma > 0,
        f"lora_ga_stable_gamma must be a positive number, got {short(c.lora_ga_stable_gamma)}",
        "lora_ga_stable_gamma",
    )
    _check(
        is_int(c.lora_ga_batches, 1),
        f"lora_ga_batches must be a positive integer, got {short(c.lora_ga_batches)}",
        "lora_ga_batches",
    )
    _check(
        c.corda_mode in CORDA_MODES,
        f"corda_mode must be one of {CORDA_MODES}, got {short(c.corda_mode)}",
        "corda_mode",
    )
    _check(
        is_int(c.corda_batches, 1),
        f"corda_batches must be a positive integer, got {short(c.corda_batches)}",
        "corda_batches",
    )
    _check(
        c.layers is None or (isinstance(c.targets, list) or c.targets == ALL_LINEAR),
        "layers cannot be combined with a regex string in targets (put the layer index in the regex instead)",
        "layers",
    )
    for pattern in [*c.rank_pattern, *c.alpha_pattern] + ([c.targets] if isinstance(c.targets, str) else []):
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"invalid regex {pattern!r}: {e}") from None


def _check_bdlora(c: Any) -> None:
    spec = c.use_bdlora
    if spec is None:
        return
    keys = {"target_modules_bd_a", "target_modules_bd_b", "nblocks", "match_strict"}
    _check(
        isinstance(spec, dict) and set(spec) <= keys,
        f"use_bdlora must be a dict with keys {sorted(keys)} or null, got {short(spec)}",
        "use_bdlora",
    )
    for name in ("target_modules_bd_a", "target_modules_bd_b"):
        v = spec.get(name)
        _check(
            v is None or is_str_list(v),
            f"use_bdlora.{name} must be a list of strings, got {short(v)}",
            "use_bdlora",
        )
    _check(
        is_int(spec.get("nblocks", 1), 1),
        f"use_bdlora.nblocks must be a positive integer, got {short(spec.get('nblocks'))}",
        "use_bdlora",
    )
    _check(
        isinstance(spec.get("match_strict", True), bool),
        f"use_bdlora.match_strict must be true or false, got {short(spec.get('match_strict'))}",
        "use_bdlora",
    )
    both = set(spec.get("target_modules_bd_a") or []) & set(spec.get("target_modules_bd_b") or [])
    _check(
        not both,
        f"use_bdlora: {sorted(both)} are in both target_modules_bd_a and target_modules_bd_b",
        "use_bdlora",
    )
    for bad, why in (
        (c.use_dora, "use_dora"),
        (c.lora_bias, "lora_bias"),
        (c.alora_invocation_tokens is not None, "alora_invocation_tokens"),
        (bool(c.target_parameters), "target_parameters"),
        (c.init not in ("default", "gaussian"), f"init={c.init!r}"),
    ):
        _check(not bad, f"use_bdlora does not work with {why}", "use_bdlora")


def _check_kasa(c: Any) -> None:
    for name in ("kasa_beta", "kasa_gamma"):
        v = getattr(c, name)
        _check(is_number(v) and v >= 0, f"{name} must be a finite number >= 0, got {short(v)}", name)
    if not c.use_kasa:
        return
    for bad, why in (
        (c.use_dora, "use_dora"),
        (c.lora_bias, "lora_bias"),
        (c.use_bdlora is not None, "use_bdlora"),
        (c.alora_invocation_tokens is not None, "alora_invocation_tokens"),
        (bool(c.target_parameters), "target_parameters"),
        (c.init not in ("default", "gaussian", "random"), f"init={c.init!r}"),
    ):
        _check(not bad, f"use_kasa does not work with {why}", "use_kasa")


def _check_types(c: Any) -> None:
    """Every field has the type and range it is documented with (JSON gives any type, and `Infinity`)."""
    _check(is_int(c.r, 1), f"r must be a positive integer, got {short(c.r)}", "r")
    _check(
        c.layer_replication is None
        or (
            isinstance(c.layer_replication, list)
            and bool(c.layer_replication)
            and all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(is_int(v, 0) for v in p) and p[0] < p[1]
                for p in c.layer_replication
            )
        ),
        f"layer_replication must be a list of [start, end) layer ranges with start < end, e.g. [[0, 20], "
        f"[10, 30]], got {short(c.layer_replication)}",
        "layer_replication",
    )
    _check(
        c.alora_invocation_tokens is None
        or (
            isinstance(c.alora_invocation_tokens, list)
            and bool(c.alora_invocation_tokens)
            and all(is_int(t, 0) for t in c.alora_invocation_tokens)
        ),
        f"alora_invocation_tokens must be a non-empty list of token ids (integers >= 0) or null, got "
        f"{short(c.alora_invocation_tokens)}",
        "alora_invocation_tokens",
    )
    _check(
        is_int(c.loftq_iter, 1),
        f"loftq_iter must be a positive integer, got {short(c.loftq_iter)}",
        "loftq_iter",
    )
    _check(
        is_number(c.eva_rho) and c.eva_rho >= 1,
        f"eva_rho must be a number >= 1, got {short(c.eva_rho)}",
        "eva_rho",
    )
    _check(
        is_number(c.eva_tau) and 0 <= c.eva_tau <= 1,
        f"eva_tau must be a number in [0, 1], got {short(c.eva_tau)}",
        "eva_tau",
    )
    _check(
        is_int(c.eva_batches, 1),
        f"eva_batches must be a positive integer, got {short(c.eva_batches)}",
        "eva_batches",
    )
    _check(
        is_number(c.alpha) and c.alpha > 0,
        f"alpha must be a finite number > 0, got {short(c.alpha)}",
        "alpha",
    )
    _check(
        is_number(c.dropout) and 0 <= c.dropout < 1,
        f"dropout must be a finite number in [0, 1), got {short(c.dropout)}",
        "dropout",
    )
    _check(
        isinstance(c.targets, str) or is_str_list(c.targets),
        f"targets must be a string or a list of strings, got {short(c.targets)}",
        "targets",
    )
    for name in ("exclude", "layers_pattern"):
        v = getattr(c, name)
        _check(
            v is None or isinstance(v, str) or is_str_list(v),
            f"{name} must be a string, a list of strings or null, got {short(v)}",
            name,
        )
    _check(
        c.layers is None or (isinstance(c.layers, list) and all(is_int(i, 0) for i in c.layers)),
        f"layers must be a list of layer indices (integers >= 0) or null, got {short(c.layers)}",
        "layers",
    )
    for name in (
        "use_rslora",
        "use_dora",
        "lora_bias",
        "eva_label_mask",
        "eva_whiten",
        "eva_adjust_scaling",
        "ensure_weight_tying",
        "use_kasa",
    ):
        v = getattr(c, name)
        _check(isinstance(v, bool), f"{name} must be true or false, got {short(v)}", name)
    for name in ("task_type", "base_model"):
        v = getattr(c, name)
        _check(v is None or isinstance(v, str), f"{name} must be a string or null, got {short(v)}", name)
    _check_token_indices(c)
    _check_bdlora(c)
    _check_kasa(c)
    _check(
        c.target_parameters is None or is_str_list(c.target_parameters),
        f"target_parameters must be a list of parameter names or null, got {short(c.target_parameters)}",
        "target_parameters",
    )
    _check(
        c.modules_to_save is None or is_str_list(c.modules_to_save),
        f"modules_to_save must be a list of module names or null, got {short(c.modules_to_save)}",
        "modules_to_save",
    )
    for name, what, ok, need in (
        ("rank_pattern", "rank", lambda v: is_int(v, 1), "a positive integer"),
        ("alpha_pattern", "alpha", lambda v: is_number(v) and v > 0, "a finite number > 0"),
    ):
        patterns = getattr(c, name)
        _check(
            isinstance(patterns, dict),
            f"{name} must be a mapping of module pattern -> {what}, got {type(patterns).__name__}",
            name,
        )
        for k, v in patterns.items():
            _check(isinstance(k, str), f"{name} keys must be strings (module patterns), got {short(k)}", name)
            _check(ok(v), f"{name}[{k!r}] must be {need}, got {short(v)}", name)


def _check_token_indices(c: Any) -> None:
    t = c.trainable_token_indices
    key = "trainable_token_indices"
    if t is None:
        return
    lists = t.values() if isinstance(t, dict) else [t]
    _check(
        isinstance(t, (list, dict)) and all(isinstance(k, str) for k in (t if isinstance(t, dict) else [])),
        f"{key} must be a list of token ids or a mapping of module name -> token ids, got {short(t)}",
        key,
    )
    for ids in lists:
        _check(
            isinstance(ids, list) and bool(ids) and all(is_int(i, 0) for i in ids),
            f"{key} must hold non-empty lists of token ids (integers >= 0), got {short(ids)}",
            key,
        )
        dup = sorted({i for i in ids if ids.count(i) > 1})
        _check(not dup, f"{key} names token id {dup[0] if dup else 0} more than once", key)


def _check(ok: bool, message: str, key: str | None = None) -> None:
    if not ok:
        raise ConfigError(message, key=key)
