"""The run config's checks (`validate`): each setting in range, and the settings that do not work together
refused in one line that names them, before any model is loaded. `lorakit.train.config.from_dict` runs them."""

from __future__ import annotations

import difflib
import re
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from lorakit.data.shapes import fields_problem
from lorakit.errors import ConfigError
from lorakit.train.validation_texts import head_checks, validate_classify, validate_embed

if TYPE_CHECKING:
    from lorakit.train.config import RunConfig


def changed_fields(section: Any, default: Any = None) -> list[str]:
    """The names of a config section's fields whose values differ from `default` (the section's own defaults)."""
    default = type(section)() if default is None else default
    return [f.name for f in fields(section) if getattr(section, f.name) != getattr(default, f.name)]


def did_you_mean(word: str, options: list[str]) -> str:
    near = difflib.get_close_matches(word, options, n=1)
    return f"; did you mean {near[0]!r}?" if near else f"; known: {', '.join(options)}"


def validate(cfg: RunConfig) -> None:
    """Raise ConfigError, naming the setting, for the first check `cfg` fails: ranges and choices, settings that
    do not work together, the objective's (`_validate_objective`), train.init_adapter's and the method's."""
    from lorakit.train.best import BEST_METRICS

    t, dsec = cfg.train, cfg.data
    best = "keep_best" if t.keep_best else "early_stop"  # the setting that needs periodic evaluations
    checks = [
        (t.steps >= 1, f"train.steps must be >= 1, got {t.steps}"),
        (t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}"),
        (t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}"),
        (t.lr > 0, f"train.lr must be > 0, got {t.lr}"),
        (
            t.schedule in ("cosine", "linear", "constant"),
            f"train.schedule must be cosine, linear or constant, got {t.schedule!r}",
        ),
        (
            cfg.model.dtype in ("auto", "float32", "bfloat16", "float16"),
            f"model.dtype must be auto, float32, bfloat16 or float16, got {cfg.model.dtype!r}",
        ),
        (
            cfg.model.adapter_dtype in ("float32", "same"),
            f"model.adapter_dtype must be float32 or same, got {cfg.model.adapter_dtype!r}",
        ),
        (
            re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(cfg.model.device)) is not None,
            f"model.device must be auto, cpu, cuda or cuda:N, got {cfg.model.device!r}",
        ),
        (
            cfg.model.quantize in (None, "nf4"),
            f"model.quantize must be nf4 or empty, got {cfg.model.quantize!r}",
        ),
        (
            isinstance(cfg.model.quantize_skip, list),
            f"model.quantize_skip must be a list of module names, got {cfg.model.quantize_skip!r}",
        ),
        (dsec.max_len >= 8, f"data.max_len must be >= 8, got {dsec.max_len}"),
        (0 < dsec.eval_split < 1, f"data.eval_split must be in (0, 1), got {dsec.eval_split}"),
        (dsec.train_file or dsec.task, "set data.train_file or data.task"),
        (t.early_stop >= 0, f"train.early_stop must be >= 0, got {t.early_stop}"),
        (
            t.best_metric in BEST_METRICS,
            f"train.best_metric must be one of {', '.join(BEST_METRICS)}, got {t.best_metric!r}",
        ),
        (
            not t.best_metric.startswith("reward_")
            or t.objective not in ("sft", "classify", "token_classify", "embed"),
            f"train.best_metric {t.best_metric} is measured with a preference objective, not {t.objective!r}",
        ),
        (
            t.best_metric != "f1" or t.objective in ("classify", "regression", "token_classify"),
            "train.best_metric f1 is measured with train.objective classify (multi-label) or token_classify, not "
            f"{t.objective!r}",
        ),
        (
            t.best_metric != "pearson" or t.objective in ("regression", "embed"),
            "train.best_metric pearson is measured with train.objective regression (or embed, of scored pairs), "
            f"not {t.objective!r}",
        ),
        (
            t.best_metric != "balanced_accuracy" or t.objective in ("classify", "regression"),
            f"train.best_metric balanced_accuracy is measured with train.objective classify, not {t.objective!r}",
        ),
        (
            t.best_metric != "accuracy" or t.objective != "reward",
            "train.best_metric accuracy is the exact match of generated answers, which a reward model does not "
            "generate; use loss, reward_accuracy or reward_margin",
        ),
        (
            t.eval_every > 0 or not (t.keep_best or t.early_stop),
            f"train.{best} compares the periodic evaluations: set train.eval_every too",
        ),
        (
            not t.fsdp or not (t.keep_best or t.early_stop),
            f"train.{best} does not work with train.fsdp yet (the best state would be shards); use DDP",
        ),
        (not fields_problem(dsec.fields), f"data.fields {fields_problem(dsec.fields)}"),
        (
            cfg.lora.init != "loftq" or cfg.model.quantize,
            "lora.init loftq starts an adapter on a 4-bit base: add --model.quantize nf4",
        ),
        (
            cfg.lora.init not in ("eva", "corda", "lora_ga") or cfg.methods[0] == "lora",
            f"lora.init {cfg.lora.init} works with method lora (and lora+loraplus), not {cfg.train.method!r}",
        ),
        (
            not dsec.add_tokens or cfg.methods[0] == "lora",
            f"data.add_tokens trains token rows with method lora, not {cfg.train.method!r}",
        ),
        (
            all(isinstance(t, str) and t.strip() for t in dsec.add_tokens)
            and len(set(dsec.add_tokens)) == len(dsec.add_tokens),
            f"data.add_tokens must be distinct non-empty strings, got {dsec.add_tokens!r}",
        ),
        (
            (dsec.alora_invocation is None and cfg.lora.alora_invocation_tokens is None)
            or cfg.methods[0] == "lora",
            f"aLoRA (data.alora_invocation, lora.alora_invocation_tokens) works with method lora, not "
            f"{cfg.train.method!r}",
        ),
        (
            dsec.alora_invocation is None
            or (isinstance(dsec.alora_invocation, str) and dsec.alora_invocation.strip()),
            f"data.alora_invocation must be a non-empty string, got {dsec.alora_invocation!r}",
        ),
        (
            dsec.alora_invocation is None or cfg.lora.alora_invocation_tokens is None,
            "set data.alora_invocation (a text) or lora.alora_invocation_tokens (its token ids), not both",
        ),
        (
            not dsec.pack or (dsec.alora_invocation is None and cfg.lora.alora_invocation_tokens is None),
            "data.pack does not work with aLoRA: an aLoRA adapter acts from the last invocation in a row on, so in a "
            "packed row it would learn from the last example only",
        ),
        (
            not (cfg.lora.use_kasa or cfg.lora.use_bdlora) or cfg.methods[0] == "lora",
            f"lora.{'use_kasa' if cfg.lora.use_kasa else 'use_bdlora'} works with method lora (and lora+loraplus), "
            f"not {cfg.train.method!r}",
        ),
        (
            not (cfg.lora.use_kasa and cfg.train.fsdp),
            "lora.use_kasa does not support train.fsdp (KaSA's regulariser reads whole A, B and d outside the "
            "forward, where FSDP2 holds shards); use DDP",
        ),
        (cfg.loraplus.ratio > 0, f"loraplus.ratio must be > 0, got {cfg.loraplus.ratio}"),
        (
            cfg.loraplus.lr_embedding >= 0,
            f"loraplus.lr_embedding must be >= 0, got {cfg.loraplus.lr_embedding}",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    _validate_objective(cfg)
    _validate_init_adapter(cfg)
    _validate_method(cfg)


# lora.init values whose adapter starts as a non-zero update (or whose base is changed): DPO's reference, the base
# with the adapters off, would not be the model training starts from
_NONZERO_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq", "random")


def _validate_objective(cfg: RunConfig) -> None:
    """train.objective is known; a preference objective's section is set only for it, with values in range; the
    data keeps pairs whole; DPO's and KTO's reference is the base model, so their adapter must start as a zero
    update."""
    from lorakit.train.objectives import (
        NAMES,
        OBJECTIVES,
        PREFERENCE_OBJECTIVES,
        REFERENCE_OBJECTIVES,
    )

    t, dsec, objective = cfg.train, cfg.data, cfg.train.objective
    if objective not in OBJECTIVES:
        raise ConfigError(f"train.objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    for name in (
        *PREFERENCE_OBJECTIVES,
        "classify",
        "embed",
    ):  # the objectives with a config section of their own
        changed = changed_fields(getattr(cfg, name))
        shared = name == "classify" and objective == "token_classify"  # a token classifier's tags weigh too
        if changed and name != objective and not shared:
            raise ConfigError(
                f"{name}.{changed[0]} is set but train.objective is {objective!r}; use --train.objective {name}"
            )
    if objective in ("classify", "regression", "token_classify"):
        validate_classify(cfg)
    if objective == "embed":
        validate_embed(cfg)
    if objective not in PREFERENCE_OBJECTIVES:
        return
    d, s, o, c, k, r = cfg.dpo, cfg.simpo, cfg.orpo, cfg.cpo, cfg.kto, cfg.reward
    name = NAMES[objective]
    alora = dsec.alora_invocation is not None or cfg.lora.alora_invocation_tokens is not None
    checks = {
        "dpo": _dpo_loss_checks("dpo", d),
        "simpo": [
            (s.beta > 0, f"simpo.beta must be > 0, got {s.beta}"),
            (s.gamma >= 0, f"simpo.gamma must be >= 0, got {s.gamma}"),
            (s.sft_weight >= 0, f"simpo.sft_weight must be >= 0, got {s.sft_weight}"),
        ],
        "orpo": [(o.beta > 0, f"orpo.beta must be > 0, got {o.beta}")],
        "cpo": _dpo_loss_checks("cpo", c),
        "kto": [
            (k.beta > 0, f"kto.beta must be > 0, got {k.beta}"),
            (k.desirable_weight > 0, f"kto.desirable_weight must be > 0, got {k.desirable_weight}"),
            (k.undesirable_weight > 0, f"kto.undesirable_weight must be > 0, got {k.undesirable_weight}"),
            (k.sft_weight >= 0, f"kto.sft_weight must be >= 0, got {k.sft_weight}"),
            (
                t.batch_size >= 2,
                "train.objective kto needs train.batch_size >= 2: its KL estimate pairs each prompt with another "
                f"answer of the micro-batch (got {t.batch_size})",
            ),
        ],
        "reward": [
            (r.center_weight >= 0, f"reward.center_weight must be >= 0, got {r.center_weight}"),
            *head_checks(cfg, "a reward model"),
        ],
    }[objective]
    if objective in REFERENCE_OBJECTIVES:  # the reference is the model training starts from, adapters off
        checks += [
            (
                cfg.lora.init not in _NONZERO_INITS,
                f"lora.init {cfg.lora.init} starts the adapter away from the base, which {name} takes as its "
                "reference; use default, gaussian, orthogonal, eva or mica, or train.objective simpo, orpo "
                "or cpo",
            ),
            (
                cfg.methods[0] != "ladder",
                f"train.objective {objective} takes the base as its reference by turning adapters off, which a "
                "ladder is not; use method lora, dylora or adalora, or train.objective simpo, orpo or cpo",
            ),
            (
                not cfg.lora.use_kasa,
                f"lora.use_kasa does not work with train.objective {objective} (KaSA changes the base, {name}'s "
                "reference); use train.objective simpo, orpo or cpo",
            ),
        ]
    checks += [
        (
            not dsec.pack,
            f"data.pack does not work with train.objective {objective} (each answer is scored on its own)",
        ),
        (
            not dsec.train_on_all,
            f"data.train_on_all does not work with train.objective {objective} (it compares answers)",
        ),
        (not alora, f"aLoRA does not work with train.objective {objective}"),
        (not dsec.add_tokens, f"data.add_tokens does not work with train.objective {objective}"),
        (
            not t.fsdp,
            f"train.fsdp does not work with train.objective {objective}; use DDP (torchrun without train.fsdp)",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


# which method each variant section belongs to; loraplus composes with any base method
SECTION_METHOD = {"dylora": "dylora", "adalora": "adalora", "ladder": "ladder", "loraplus": "loraplus"}


def _validate_method(cfg: RunConfig) -> None:
    """train.method names known methods, no variant section is set for a method that is not selected, and the
    chosen method accepts the settings (`Method.check_config`)."""
    from lorakit.train.methods import METHODS

    parts = [p.strip() for p in cfg.train.method.split("+") if p.strip()]
    base = [p for p in parts if p != "loraplus"]
    for p in parts:
        if p not in (*METHODS, "loraplus"):
            raise ConfigError(f"train.method: unknown method {p!r}{did_you_mean(p, [*METHODS, 'loraplus'])}")
    if len(base) > 1 or not parts or len(parts) != len(set(parts)):
        raise ConfigError(
            f"train.method {cfg.train.method!r}: give one of {', '.join(METHODS)}, optionally with +loraplus"
        )
    chosen = set(parts)
    for section, method in SECTION_METHOD.items():
        changed = changed_fields(getattr(cfg, section))
        if changed and method not in chosen:
            raise ConfigError(
                f"{section}.{changed[0]} is set but train.method is {cfg.train.method!r}; "
                f"use --method {method}"
                + ("" if method == "loraplus" else f" (or drop the {section} options)")
            )
    METHODS[cfg.methods[0]].check_config(cfg)


def _validate_init_adapter(cfg: RunConfig) -> None:
    """train.init_adapter brings its own adapter settings: the lora section stays at its defaults, the method is
    plain LoRA (LoRA+ composes), and nothing adds to the adapter (aLoRA's invocation, new tokens)."""
    t, dsec = cfg.train, cfg.data
    if not t.init_adapter:
        return
    changed = changed_fields(cfg.lora, type(cfg)().lora)  # against the run's default lora section
    checks = [
        (
            not changed,
            f"lora.{changed[0] if changed else ''} is set but train.init_adapter starts from an adapter with its "
            "own settings; drop the lora options",
        ),
        (
            cfg.methods[0] == "lora",
            f"train.init_adapter trains an adapter further with method lora (and lora+loraplus), not "
            f"{t.method!r}",
        ),
        (not dsec.add_tokens, "data.add_tokens does not work with train.init_adapter"),
        (dsec.alora_invocation is None, "data.alora_invocation does not work with train.init_adapter"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def _dpo_loss_checks(name: str, sec: Any) -> list[tuple[bool, str]]:
    """The checks of a section with DPO's loss settings (dpo's, cpo's): beta, loss, label_smoothing, sft_weight."""
    from lorakit.train.objectives import DPO_LOSSES

    return [
        (sec.beta > 0, f"{name}.beta must be > 0, got {sec.beta}"),
        (sec.loss in DPO_LOSSES, f"{name}.loss must be one of {', '.join(DPO_LOSSES)}, got {sec.loss!r}"),
        (
            0 <= sec.label_smoothing < 0.5,
            f"{name}.label_smoothing must be in [0, 0.5), got {sec.label_smoothing}",
        ),
        (
            not sec.label_smoothing or sec.loss == "sigmoid",
            f"{name}.label_smoothing works with {name}.loss sigmoid, not {sec.loss!r}",
        ),
        (sec.sft_weight >= 0, f"{name}.sft_weight must be >= 0, got {sec.sft_weight}"),
    ]
