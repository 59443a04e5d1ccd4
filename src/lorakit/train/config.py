"""Run configuration for `lorakit train`: typed sections, a YAML file, and `--section.key value` overrides.

Every field has a one-line docstring; `lorakit train --help` lists them all. Unknown keys are errors with a
"did you mean". The resolved config is written into the run folder and can be used as the config of a new run.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from lorakit.config import LoraConfig
from lorakit.errors import ConfigError
from lorakit.train.fieldtypes import CommandLineValue, check, field_docs
from lorakit.train.validation import did_you_mean, validate
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
    """Built-in task to train on when no train_file is given ("dates"; an embedding model: "dates-scored" too, pairs
    scored for similarity)."""
    train_file: str | None = None
    """Training file: JSONL, a JSON array, CSV/TSV, Parquet or Arrow, or a folder `datasets`' save_to_disk
    wrote, of {prompt,completion}, {messages} or {text} records, or Alpaca's {instruction,input,output} or
    ShareGPT's {conversations} (docs/data.md)."""
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
    keep_best: bool = False
    """With eval_every: end with the evaluated state of the best best_metric (the periodic evaluations and the
    last state): the saved adapter and the "after" evaluation are the best's."""
    early_stop: int = 0
    """With eval_every: stop once this many evaluations in a row have not bettered best_metric (0: never)."""
    best_metric: str = "loss"
    """What keep_best and early_stop compare: loss (the eval loss, lower is better), accuracy (exact match; a
    classifier's accuracy; a token classifier's, of its tags; an embedding model's, the held-out anchors whose
    positive ranks first), with train.objective classify balanced_accuracy (one
    class per text) or f1 (several), with token_classify f1 (of the entities), with regression pearson, or with a
    preference objective reward_accuracy or reward_margin (higher is better)."""
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
    """What training minimises: sft (the answers' token loss), on preference pairs dpo, simpo, orpo or cpo
    (each with its own section; simpo, orpo and cpo need no reference model), kto on answers marked
    desirable or not, or reward: a reward model (the model with a one-output head, trained on pairs); classify: a
    text classifier (labelled texts), regression: a number per text, token_classify: a token classifier (tagged
    texts: named entities; docs/token_classify.md), embed: an embedding model (texts and the texts that belong
    with them; docs/embeddings.md)."""
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
    precompute_reference: bool = False
    """DPO: the reference's log-probabilities of every train pair computed once before training, not each step
    (pays off when pairs are seen more than once)."""


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
class CpoSection:
    beta: float = 0.1
    """CPO: scale of the reward, beta times an answer's summed log-probability (the paper's and TRL's 0.1)."""
    loss: str = "sigmoid"
    """CPO's loss: sigmoid (the paper's), ipo (on per-token mean log-probabilities) or hinge, as DPO's."""
    label_smoothing: float = 0.0
    """CPO (sigmoid loss): the assumed share of pairs whose preference is wrong, in [0, 0.5)."""
    sft_weight: float = 1.0
    """CPO: weight of the chosen answers' token loss added to the preference loss (the paper's NLL term, TRL's
    cpo_alpha); 0 leaves the preference loss alone."""


@dataclass
class KtoSection:
    beta: float = 0.1
    """KTO: how far the model may move from the reference (the base): larger keeps it closer."""
    desirable_weight: float = 1.0
    """KTO: weight of the desirable answers' loss (the paper's lambda_D); with fewer desirable than undesirable
    answers, raise it so that weight x count is 1 to 4/3 times the undesirable side's."""
    undesirable_weight: float = 1.0
    """KTO: weight of the undesirable answers' loss (the paper's lambda_U)."""
    sft_weight: float = 0.0
    """KTO: weight of the desirable answers' token loss added to the KTO loss."""


@dataclass
class RewardSection:
    center_weight: float = 0.0
    """Reward model: weight of the mean squared reward added to the pairwise loss, which keeps the rewards
    centred on 0 (Eisenstein et al., 2023; TRL's center_rewards_coefficient, 0.01 there); 0: none."""


@dataclass
class ClassifySection:
    class_weights: str | dict[str, float] = "none"
    """Classifier: how much each class's examples weigh in the loss. none: all 1; balanced: n / (classes x the
    class's count in the train data), so rare classes weigh more (scikit-learn's rule); or {class name: weight},
    classes not named weighing 1. The loss is the mean over examples of weight x cross-entropy (Keras'
    class_weight), so gradient accumulation and DDP give the loss of one large batch. Of multi-label data, the
    weights are each class's positives' (pos_weight): balanced is the class's negatives over its positives. Of a
    token classifier (train.objective token_classify), the weights are its tags' ({B-PER: 2}), counted over the
    tagged tokens of the train data, and the loss the mean over those tokens."""


@dataclass
class EmbedSection:
    pooling: str = "auto"
    """Embedding model (train.objective embed): how one vector is read from a text's last hidden states. auto: what
    the model folder's sentence-transformers Pooling module says (MiniLM: mean), else mean for an encoder and last
    (the last token) for a decoder; or mean, last, cls."""
    scale: float = 20.0
    """The in-batch contrastive loss's scale on the cosine similarities (1 / temperature; sentence-transformers'
    MultipleNegativesRankingLoss uses 20)."""
    symmetric: bool = False
    """Also the loss of each positive finding its anchor among the batch's anchors (the mean of both directions),
    as CLIP's and sentence-transformers' MultipleNegativesSymmetricRankingLoss."""
    chunk_size: int = 0
    """Embed each column this many texts at a time, under a checkpoint (GradCache, sentence-transformers'
    CachedMultipleNegativesRankingLoss): the same loss and gradients as the whole micro-batch, with one chunk's
    activations in memory, for a second forward pass; so a large train.batch_size, a large pool of negatives,
    fits. 0: each column in one forward."""
    matryoshka_dims: list[int] = field(default_factory=list)
    """Matryoshka training (sentence-transformers' MatryoshkaLoss): the loss is the sum of the contrastive loss of
    the vectors cut to each of these first dimensions (renormalized), e.g. [576, 256, 64] for SmolLM2, so that a
    vector cut short (/v1/embeddings' dimensions, lorakit eval --dimensions) keeps its quality. List the model's
    full width too, or it is not trained for itself. Empty: the full vector alone."""
    matryoshka_weights: list[float] = field(default_factory=list)
    """Each matryoshka_dims' loss's weight in the sum, in the same order. Empty: 1 each."""
    gather: bool = False
    """Under torchrun (DDP): contrast each anchor with every process's positives and negatives, not its own
    process's alone (sentence-transformers' gather_across_devices): a pool of processes x train.batch_size, for
    the cost of sending the vectors. Exact: each process's vectors get the gradients every process's loss sends."""


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
    cpo: CpoSection = field(default_factory=CpoSection)
    kto: KtoSection = field(default_factory=KtoSection)
    reward: RewardSection = field(default_factory=RewardSection)
    classify: ClassifySection = field(default_factory=ClassifySection)
    embed: EmbedSection = field(default_factory=EmbedSection)

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


def from_dict(d: dict[str, Any], *, source: str = "config") -> RunConfig:
    """Build a RunConfig from nested dicts; unknown sections or keys are errors with a suggestion."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(d).__name__}")
    kwargs: dict[str, Any] = {}
    for section, values in d.items():
        if section not in SECTIONS:
            raise ConfigError(
                f"{source}: unknown section {section!r}{did_you_mean(section, list(SECTIONS))}"
            )
        values = values or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping, got {type(values).__name__}")
        known = _section_fields(section)
        for key in values:
            if key not in known:
                raise ConfigError(f"{source}: unknown key {section}.{key}{did_you_mean(key, list(known))}")
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
