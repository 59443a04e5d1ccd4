"""Run configuration for `lorakit train`: typed sections, a YAML file, and `--section.key value` overrides.

Every field has a one-line docstring; `lorakit train --help` lists them all. Unknown keys are errors with a
"did you mean". The resolved config is written into the run folder and can be used as the config of a new run.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from lorakit.config import LoraConfig
from lorakit.data.shapes import fields_problem
from lorakit.errors import ConfigError
from lorakit.train.fieldtypes import CommandLineValue, check, field_docs
from lorakit.variants.adalora import AdaLoraConfig
from lorakit.variants.dylora import DyLoraConfig
from lorakit.variants.ladder import LadderConfig


@dataclass
class ModelSection:
    path: str | None = None
    """Base model: a Hugging Face folder or a .gguf file; empty for the default SmolLM2-135M-Instruct."""
    device: str = "auto"
    """Where to train: auto (a CUDA GPU if torch sees one, else the CPU), cpu, cuda or cuda:N (torchrun: cuda:LOCAL_RANK)."""
    dtype: str = "auto"
    """The frozen base's dtype: auto (bfloat16 on a GPU, float16 on one without bf16; on the CPU bfloat16 where it
    is native and a timed probe finds it faster, else float32), float32, bfloat16 or float16. config.yaml records
    the one chosen."""
    adapter_dtype: str = "float32"
    """The adapters' dtype: float32 (AdamW's small updates survive; a 16-bit base computes under autocast) or same
    (the base's dtype: less memory, coarser updates)."""
    quantize: str | None = None
    """QLoRA: quantize the base's linear layers to 4 bits before adding LoRA ("nf4"); empty: full precision."""
    quantize_skip: list[str] = field(default_factory=lambda: ["lm_head"])
    """With quantize: linear layers kept in full precision (module names or name suffixes)."""
    double_quant: bool = True
    """With quantize: store the block scales in 8 bits too (~4.13 bits per weight instead of 4.5)."""


@dataclass
class DataSection:
    task: str | None = "dates"
    """Built-in task to train on when no train_file is given ("dates")."""
    train_file: str | None = None
    """Training file: JSONL, a JSON array, CSV/TSV or Parquet, of {prompt,completion}, {messages} or {text}
    records, or Alpaca's {instruction,input,output} or ShareGPT's {conversations} (docs/data.md)."""
    eval_file: str | None = None
    """Evaluation file, in the same formats; if empty, eval_split of the training data is held out."""
    fields: dict[str, str] = field(default_factory=dict)
    """The data files' column names for lorakit's keys, e.g. {prompt: question, completion: answer}."""
    eval_split: float = 0.05
    """Fraction of train_file held out for evaluation when eval_file is empty."""
    n_train: int = 2000
    """Built-in task: number of training examples generated."""
    n_eval: int = 100
    """Built-in task: number of held-out evaluation examples."""
    max_len: int = 256
    """Maximum tokens per example (longer ones are cut, and counted)."""
    chat: bool = True
    """Apply the tokenizer's chat template to prompts and messages."""
    train_on_all: bool = False
    """Learn every token, prompts and user turns included (default: completions and assistant turns only)."""
    pack: bool = False
    """Concatenate short examples into rows of max_len tokens."""
    add_tokens: list[str] = field(default_factory=list)
    """New tokens for the tokenizer (e.g. "<tool>,</tool>"): the embeddings are resized, only those rows train
    (and the output head's, where tied), and the tokenizer is saved beside the adapter (method lora only)."""
    alora_invocation: str | None = None
    """aLoRA: the text whose tokens invoke the adapter (e.g. "<|im_start|>assistant"); sets
    lora.alora_invocation_tokens from the tokenizer. Each example's prompt should contain it (method lora only)."""


@dataclass
class TrainSection:
    out_dir: str = "runs/train"
    """Run folder: config.yaml, metrics.jsonl, loss.png, adapter/, checkpoints/."""
    steps: int = 40
    """Optimizer steps."""
    batch_size: int = 8
    """Examples per micro-batch (per process)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 2e-3
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    schedule: str = "cosine"
    """Learning-rate schedule after warmup: cosine, linear or constant."""
    warmup_steps: int = 4
    """Linear warmup steps."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    grad_checkpointing: bool = False
    """Non-reentrant gradient checkpointing (less memory, ~30% slower)."""
    seed: int = 0
    """Seed for initialisation, data order and dropout."""
    eval_every: int = 0
    """Evaluate every N steps (0: only before and after training)."""
    save_every: int = 20
    """Write a resumable checkpoint every N steps (0: never)."""
    log_every: int = 1
    """Write metrics every N steps."""
    resume: str | None = None
    """Checkpoint folder to resume from, or "auto" for the newest in out_dir/checkpoints."""
    threads: int = 0
    """CPU threads for torch (0: all cores)."""
    fused: bool = True
    """Fused LoRA kernels and a chunked LM-head loss (false: plain autograd, for debugging)."""
    fsdp: bool = False
    """Shard the model with FSDP2 (fully_shard) across torchrun processes instead of DDP."""
    method: str = "lora"
    """Training method: lora, dylora, adalora or ladder; add "+loraplus" (or give just loraplus) for LoRA+."""
    objective: str = "sft"
    """What training minimises: sft (the answers' token loss), or on preference pairs dpo, simpo or orpo (each
    with its own section; simpo and orpo need no reference model)."""
    init_adapter: str | None = None
    """An adapter folder (PEFT layout) to train further instead of a new adapter, with its own r, alpha and
    targets (method lora); with objective dpo it is also the reference."""


@dataclass
class LoraPlusSection:
    ratio: float = 16.0
    """LoRA+: learning rate of every B matrix = ratio x train.lr (A keeps train.lr)."""
    lr_embedding: float = 1e-6
    """LoRA+: learning rate of embedding-layer adapters."""


def section_from(
    source: type, name: str, *, skip: tuple[str, ...] = (), docs: dict[str, str] | None = None
) -> type:
    """A run-config section class `name` made of the fields of dataclass `source` (a variant's own config) but
    `skip`: the same names, order, types, defaults and field docs (`docs` replaces some). It only holds values:
    `source`'s own checks run when the method builds its config from the section (`Method.check_config`), where
    run-wide settings can fill in, e.g. AdaLoRA's total_step from train.steps."""
    hints = typing.get_type_hints(source)
    notes = {**field_docs(source), **(docs or {})}

    def copy(f: dataclasses.Field) -> tuple[str, Any, dataclasses.Field]:
        doc = {"doc": notes.get(f.name, "")}
        return (
            f.name,
            hints[f.name],
            field(default=f.default, default_factory=f.default_factory, metadata=doc),
        )

    specs = [copy(f) for f in fields(source) if f.name not in skip]
    cls = dataclasses.make_dataclass(name, specs)
    cls.__module__ = __name__  # importable (and picklable) as lorakit.train.config.<name>
    cls.__doc__ = f"The fields of {source.__module__}.{source.__qualname__}" + (
        f" but {', '.join(skip)}." if skip else "."
    )
    return cls


DyLoraSection = section_from(DyLoraConfig, "DyLoraSection")
AdaLoraSection = section_from(
    AdaLoraConfig,
    "AdaLoraSection",
    skip=("rank_pattern",),  # the allocator's result, not a setting
    docs={"total_step": "Total optimizer steps of the schedule (default: train.steps)."},
)
LadderSection = section_from(LadderConfig, "LadderSection", skip=("mlp_ratio",))


@dataclass
class DpoSection:
    beta: float = 0.1
    """DPO: how far the model may move from the reference (the base): larger keeps it closer."""
    loss: str = "sigmoid"
    """DPO's loss: sigmoid (DPO), ipo (IPO, on per-token mean log-probabilities) or hinge (SLiC)."""
    label_smoothing: float = 0.0
    """DPO (sigmoid loss): the assumed share of pairs whose preference is wrong, in [0, 0.5) (cDPO)."""
    sft_weight: float = 0.0
    """DPO: weight of the chosen answers' token loss added to the preference loss (RPO; TRL's rpo_alpha)."""


@dataclass
class SimpoSection:
    beta: float = 2.0
    """SimPO: scale of the reward, beta times an answer's mean token log-probability (the paper uses 2 to 10)."""
    gamma: float = 1.0
    """SimPO: the reward margin the chosen answer must win by (the paper's gamma; TRL's simpo_gamma)."""
    sft_weight: float = 0.0
    """SimPO: weight of the chosen answers' token loss added to the preference loss (CPO's alpha)."""


@dataclass
class OrpoSection:
    beta: float = 0.1
    """ORPO: weight (the paper's lambda) of the odds-ratio loss added to the chosen answers' token loss."""


@dataclass
class EvalSection:
    max_new_tokens: int = 16
    """Tokens generated per eval example for exact-match accuracy."""
    limit: int = 100
    """Eval examples used for accuracy (eval loss uses all)."""


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=16, alpha=32, targets="all-linear"))
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    loraplus: LoraPlusSection = field(default_factory=LoraPlusSection)
    dylora: DyLoraSection = field(default_factory=DyLoraSection)
    adalora: AdaLoraSection = field(default_factory=AdaLoraSection)
    ladder: LadderSection = field(default_factory=LadderSection)
    dpo: DpoSection = field(default_factory=DpoSection)
    simpo: SimpoSection = field(default_factory=SimpoSection)
    orpo: OrpoSection = field(default_factory=OrpoSection)

    @property
    def methods(self) -> tuple[str, bool]:
        """(base method, LoRA+ on?) from train.method, e.g. "adalora+loraplus" -> ("adalora", True)."""
        parts = [p.strip() for p in self.train.method.split("+") if p.strip()]
        plus = "loraplus" in parts
        rest = [p for p in parts if p != "loraplus"]
        return (rest[0] if rest else "lora"), plus

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f for f in fields(RunConfig)}


def _section_fields(name: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in fields(SECTIONS[name].default_factory())}


def _did_you_mean(word: str, options: list[str]) -> str:
    near = difflib.get_close_matches(word, options, n=1)
    return f"; did you mean {near[0]!r}?" if near else f"; known: {', '.join(options)}"


def from_dict(d: dict[str, Any], *, source: str = "config") -> RunConfig:
    """Build a RunConfig from nested dicts; unknown sections or keys are errors with a suggestion."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(d).__name__}")
    kwargs: dict[str, Any] = {}
    for section, values in d.items():
        if section not in SECTIONS:
            raise ConfigError(
                f"{source}: unknown section {section!r}{_did_you_mean(section, list(SECTIONS))}"
            )
        values = values or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping, got {type(values).__name__}")
        known = _section_fields(section)
        for key in values:
            if key not in known:
                raise ConfigError(f"{source}: unknown key {section}.{key}{_did_you_mean(key, list(known))}")
        defaults = SECTIONS[section].default_factory()  # the run's defaults; the file's values win
        hints = typing.get_type_hints(type(defaults))
        values = {
            key: check(
                v,
                hints[key],
                f"--{section}.{key}" if isinstance(v, CommandLineValue) else f"{source}: {section}.{key}",
            )
            for key, v in values.items()
        }
        try:
            kwargs[section] = type(defaults)(**{**dataclasses.asdict(defaults), **values})
        except TypeError as e:
            raise ConfigError(f"{source}: section {section!r}: {e}") from None
    cfg = RunConfig(**kwargs)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    t, dsec = cfg.train, cfg.data
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
            (dsec.alora_invocation is None and cfg.lora.alora_invocation_tokens is None) or cfg.methods[0] == "lora",
            f"aLoRA (data.alora_invocation, lora.alora_invocation_tokens) works with method lora, not "
            f"{cfg.train.method!r}",
        ),
        (
            dsec.alora_invocation is None or (isinstance(dsec.alora_invocation, str) and dsec.alora_invocation.strip()),
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
    data keeps pairs whole; DPO's reference is the base model, so its adapter must start as a zero update."""
    from lorakit.train.objectives import DPO_LOSSES, OBJECTIVES, PREFERENCE_OBJECTIVES

    t, dsec, objective = cfg.train, cfg.data, cfg.train.objective
    if objective not in OBJECTIVES:
        raise ConfigError(f"train.objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    for name in PREFERENCE_OBJECTIVES:
        section = getattr(cfg, name)
        default = type(section)()
        changed = [f.name for f in fields(section) if getattr(section, f.name) != getattr(default, f.name)]
        if changed and name != objective:
            raise ConfigError(
                f"{name}.{changed[0]} is set but train.objective is {objective!r}; use --train.objective {name}"
            )
    if objective not in PREFERENCE_OBJECTIVES:
        return
    d, s, o = cfg.dpo, cfg.simpo, cfg.orpo
    alora = dsec.alora_invocation is not None or cfg.lora.alora_invocation_tokens is not None
    checks = {
        "dpo": [
            (d.beta > 0, f"dpo.beta must be > 0, got {d.beta}"),
            (d.loss in DPO_LOSSES, f"dpo.loss must be one of {', '.join(DPO_LOSSES)}, got {d.loss!r}"),
            (0 <= d.label_smoothing < 0.5, f"dpo.label_smoothing must be in [0, 0.5), got {d.label_smoothing}"),
            (
                not d.label_smoothing or d.loss == "sigmoid",
                f"dpo.label_smoothing works with dpo.loss sigmoid, not {d.loss!r}",
            ),
            (d.sft_weight >= 0, f"dpo.sft_weight must be >= 0, got {d.sft_weight}"),
            (
                cfg.lora.init not in _NONZERO_INITS,
                f"lora.init {cfg.lora.init} starts the adapter away from the base, which DPO takes as its "
                "reference; use default, gaussian, orthogonal, eva or mica, or train.objective simpo or orpo",
            ),
            (
                cfg.methods[0] != "ladder",
                "train.objective dpo takes the base as its reference by turning adapters off, which a ladder is "
                "not; use method lora, dylora or adalora, or train.objective simpo or orpo",
            ),
            (
                not cfg.lora.use_kasa,
                "lora.use_kasa does not work with train.objective dpo (KaSA changes the base, DPO's reference)",
            ),
        ],
        "simpo": [
            (s.beta > 0, f"simpo.beta must be > 0, got {s.beta}"),
            (s.gamma >= 0, f"simpo.gamma must be >= 0, got {s.gamma}"),
            (s.sft_weight >= 0, f"simpo.sft_weight must be >= 0, got {s.sft_weight}"),
        ],
        "orpo": [(o.beta > 0, f"orpo.beta must be > 0, got {o.beta}")],
    }[objective]
    checks += [
        (not dsec.pack, f"data.pack does not work with train.objective {objective} (a pair's answers stay apart)"),
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
            raise ConfigError(f"train.method: unknown method {p!r}{_did_you_mean(p, [*METHODS, 'loraplus'])}")
    if len(base) > 1 or not parts or len(parts) != len(set(parts)):
        raise ConfigError(
            f"train.method {cfg.train.method!r}: give one of {', '.join(METHODS)}, optionally with +loraplus"
        )
    chosen = set(parts)
    for section, method in SECTION_METHOD.items():
        obj = getattr(cfg, section)
        default = type(obj)()
        changed = [f.name for f in fields(obj) if getattr(obj, f.name) != getattr(default, f.name)]
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
    default = RunConfig().lora
    changed = [f.name for f in fields(cfg.lora) if getattr(cfg.lora, f.name) != getattr(default, f.name)]
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


def parse_value(text: str) -> Any:
    """A command-line value, kept as its text until `from_dict` converts it by its field's type (int, float, bool,
    str, null, lists "[q_proj, v_proj]", mappings "{q_proj: 2}"): lorakit.train.fieldtypes."""
    return CommandLineValue(text)


# --method X is short for --train.method X, --model PATH for --model.path PATH, --objective X for --train.objective X
SHORTHANDS = {"method": "train.method", "model": "model.path", "objective": "train.objective"}


def load_config(path: str | os.PathLike | None, overrides: list[str]) -> RunConfig:
    """A YAML file (or the defaults) plus `--section.key value` overrides."""
    data = read_yaml(Path(path)) if path else {}
    i = 0
    while i < len(overrides):
        arg = overrides[i]
        if not arg.startswith("--") or ("." not in arg and arg[2:].partition("=")[0] not in SHORTHANDS):
            raise ConfigError(
                f"override {arg!r} must look like --section.key value (or {', '.join('--' + s for s in SHORTHANDS)})"
            )
        key, _, inline = arg[2:].partition("=")
        if inline == "" and "=" not in arg:
            if i + 1 >= len(overrides) or overrides[i + 1].startswith("--"):
                raise ConfigError(f"override {arg} needs a value")
            value, i = overrides[i + 1], i + 2
        else:
            value, i = inline, i + 1
        key = SHORTHANDS.get(key, key)
        section, _, name = key.partition(".")
        data.setdefault(section, {})[name.replace("-", "_")] = parse_value(value)
    return from_dict(data, source=str(path) if path else "command line")


def read_yaml(p: Path) -> dict[str, Any]:
    """A YAML config file as {section: {key: value}}; ConfigError naming the file if it is not one."""
    if not p.exists():
        raise ConfigError(f"{p}: config file not found")
    if not p.is_file():
        raise ConfigError(f"{p}: not a file")
    try:
        data = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"{p}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of sections, got {type(data).__name__}")
    for section, values in data.items():
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"{p}: section {section!r} must be a mapping, got {type(values).__name__}")
    return {k: dict(v or {}) for k, v in data.items()}


def save_config(cfg: RunConfig, path: Path) -> None:
    from lorakit.atomic import atomic_file

    atomic_file(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
