"""Adapter folders: the table of formats, keyed by PEFT's `peft_type`, and what the formats share.

A folder is `adapter_config.json` + `adapter_model.safetensors` (PEFT's layout). Its `peft_type` picks the format
once (`folder_format`); the format's hooks then plan a load (every check, the model untouched), apply the plan,
save, and describe. `lorakit.lora_format` registers PEFT's LORA layout; plug-ins register theirs
(lorakit.variants: ADALORA, and our LADDER). Plug-ins also add safetensors metadata to every saved adapter
(`register_metadata`: the quantized base it was trained on) and look at every loaded one (`register_load_hook`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lorakit.atomic import atomic_dir
from lorakit.config import LoraConfig
from lorakit.control import FOLDER_CHECKS, FOLDER_USES
from lorakit.errors import AdapterFileError, ConfigError, TargetError
from lorakit.readers import load_weights_only, read_json, read_safetensors, safetensors_metadata
from lorakit.registry import AdapterInfo
from lorakit.targeting import select_modules
from lorakit.task_types import POOLINGS, pooling_of, task_heads, task_type_for  # noqa: F401  (re-exported: the formats' users)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
DEFAULT = "LORA"


@dataclass(frozen=True)
class AdapterFormat:
    """One adapter format: its peft_type and its hooks."""

    peft_type: str
    label: str
    """How messages name it ("LoRA", "AdaLoRA", "ladder")."""
    plan: Callable[[nn.Module, Path, dict[str, Any], str, bool], Any]
    """(model, folder, its parsed config, adapter name, allow_pickle) -> what `apply` needs. Reads and checks
    everything; raises if the folder does not fit the model, which it never changes."""
    apply: Callable[[nn.Module, Any, str, bool], str]
    """(model, plan, name, trainable) -> the adapter's name on the model. All or nothing."""
    owns: Callable[[nn.Module, str], bool]
    """Whether adapter `name` on `model` is saved in this format."""
    save: Callable[[nn.Module, Path, str], Path]
    """Write adapter `name` of `model` as a folder, atomically."""
    describe: Callable[[Path, dict[str, Any]], dict[str, Any]]
    """What `lorakit inspect` shows of a folder (its parsed config given), without a model."""
    state_dict: Callable[[nn.Module, str], dict[str, torch.Tensor]] | None = None
    """The tensors `save` writes for adapter `name`, keyed as in the file."""
    activates: bool = True
    """Whether loading can activate the adapter (a ladder is attached, not activated)."""
    suffix: str | None = None
    """A single-file format (not a folder): the file name's suffix, e.g. ".gguf" (llama.cpp's LoRA files)."""


FORMATS: dict[str, AdapterFormat] = {}
METADATA: list[Callable[[nn.Module, str], dict[str, str]]] = []
LOAD_HOOKS: list[Callable[[nn.Module, Path], None]] = []


def register_format(fmt: AdapterFormat) -> AdapterFormat:
    """Make `fmt` the format of folders whose adapter_config.json says `peft_type: fmt.peft_type`."""
    FORMATS[fmt.peft_type.upper()] = fmt
    return fmt


def register_metadata(provider: Callable[[nn.Module, str], dict[str, str]]) -> None:
    """Add `provider(model, adapter_name)`'s entries to the safetensors metadata of every adapter saved."""
    METADATA.append(provider)


def register_load_hook(hook: Callable[[nn.Module, Path], None]) -> None:
    """Call `hook(model, folder)` after every adapter is loaded (e.g. to note a quantized-base mismatch)."""
    LOAD_HOOKS.append(hook)


def folder_refusal(path: str | os.PathLike, use: str) -> str | None:
    """Why adapter folder `path` cannot serve `use` ("bank", "merge" or "gguf"; lorakit.control.FOLDER_CHECKS),
    as "<path>: <reason>", or None. Reads the config only: it runs before any model loads."""
    if use not in FOLDER_USES:
        raise ValueError(f"use must be one of {FOLDER_USES}, got {use!r}")
    config = folder_format(path)[1]
    for check in FOLDER_CHECKS:
        reason = check(config, use)
        if reason:
            return f"{path}: {reason}"
    return None


def folder_format(path: str | os.PathLike) -> tuple[AdapterFormat, dict[str, Any]]:
    """(the format of adapter folder `path`, its parsed adapter_config.json). The one place that asks.

    A file whose suffix a single-file format registered (".gguf") is that format's, with an empty config."""
    if Path(path).is_file():
        fmt = next((f for f in FORMATS.values() if f.suffix == Path(path).suffix.lower()), None)
        if fmt is not None:
            return fmt, {}
    raw = read_config_json(path)
    peft_type = raw.get("peft_type")
    if peft_type is None:  # LORA's parser names the missing key
        return FORMATS[DEFAULT], raw
    fmt = FORMATS.get(str(peft_type).upper())
    if fmt is None:
        raise ConfigError(
            f"{Path(path) / CONFIG_NAME}: unsupported peft_type {peft_type!r} (lorakit loads "
            f"{', '.join(FORMATS)} adapters)"
        )
    return fmt, raw


def model_format(model: nn.Module, name: str) -> AdapterFormat:
    """The format adapter `name` on `model` is saved in: the first non-default format that owns it, else LORA."""
    for fmt in FORMATS.values():
        if fmt.peft_type != DEFAULT and fmt.suffix is None and fmt.owns(model, name):
            return fmt
    return FORMATS[DEFAULT]


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


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


_HEAD_KEY = re.compile(r"base_model\.model\.(?:score|classifier)(?:\.out_proj)?\.weight")


def adapter_num_labels(path: str | os.PathLike, task: str = "SEQ_CLS") -> int | None:
    """How many outputs the head of a sequence-classification adapter (task_type SEQ_CLS: a reward model has 1)
    has, from its saved copy's shape in the safetensors header (no tensor is read); None for any other adapter,
    which goes on a causal LM. Lets `lorakit merge`, `eval` and the others load the base as the classifier it
    was trained on (`lorakit.load_model(num_labels=...)`). `task` TOKEN_CLS: the tags of a token classifier's
    adapter instead (`lorakit.load_model(num_labels=..., per_token=True)`)."""
    path = Path(path)
    if path.is_file() or read_config_json(path).get("task_type") != task:
        return None
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(weights), "pt") as f:
            shapes = [f.get_slice(k).get_shape() for k in f.keys() if _HEAD_KEY.fullmatch(k)]  # noqa: SIM118
    except Exception as e:  # safetensors raises its own SafetensorError
        raise AdapterFileError(f"{weights}: not a readable safetensors file ({e})") from None
    return int(shapes[0][0]) if shapes and len(shapes[0]) == 2 else None


def read_tensors(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The adapter folder's tensors, each a floating-point tensor of finite values (else AdapterFileError)."""
    tensors = _read_tensor_file(Path(path), allow_pickle)
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise AdapterFileError(f"{path}: {key} has dtype {t.dtype}, not a floating-point type")
    for key in _not_finite_suspects(tensors):
        if not bool(torch.isfinite(tensors[key]).all()):
            raise AdapterFileError(f"{path}: {key} has non-finite values (nan or inf)")
    return tensors


def _not_finite_suspects(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The keys of the tensors that may hold a nan or an inf: those whose norm is not finite, in one fused call
    instead of one check per tensor (mixed dtypes are fine). A nan or inf always makes the norm non-finite; a norm
    that overflows the dtype makes a tensor a suspect that the exact check then clears."""
    keys = [k for k, t in tensors.items() if t.numel()]
    if not keys:
        return []
    norms = torch._foreach_norm([tensors[k] for k in keys])
    finite = torch.isfinite(torch.stack([n.float().cpu() for n in norms]))
    return [k for k, ok in zip(keys, finite.tolist(), strict=True) if not ok]


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


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors metadata of the adapter folder `path` ({} if there is none)."""
    file = Path(path) / WEIGHTS_NAME
    return safetensors_metadata(file) if file.exists() else {}


# --------------------------------------------------------------------------------------------------------------
# Writing: what every format's config and metadata share
# --------------------------------------------------------------------------------------------------------------


def write_folder(
    path: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], metadata: dict[str, str]
) -> Path:
    """Write an adapter folder (safetensors + adapter_config.json) atomically, keeping other files in it."""

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=metadata)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    path = Path(path)
    atomic_dir(path, write, keep_others=True)
    return path


LABELS_KEY = "lorakit.labels"
"""Safetensors metadata of a classifier's adapter: its class names by id (a JSON list), which PEFT's files lack."""
PROBLEM_KEY = "lorakit.problem"
"""Safetensors metadata of a regression's adapter, "regression", which tells it from a reward model's (one output
too), and of a multi-label classifier's, "multi_label_classification" (transformers' problem_type, either)."""
PROBLEMS = ("regression", "multi_label_classification")
POOLING_KEY = "lorakit.pooling"
"""Safetensors metadata of an embedding model's adapter (task_type FEATURE_EXTRACTION): how it pools the hidden
states into one vector per text ("mean", "last", "cls"; `task_types.POOLINGS`)."""


def file_metadata(model: nn.Module, name: str) -> dict[str, str]:
    """The safetensors metadata of a saved adapter: "format": "pt", a sequence classifier's class names (when
    they are not transformers' LABEL_0, LABEL_1, ...), plus what the plug-ins record."""
    out = {"format": "pt"}
    names = class_names_of(model)
    if names is not None:
        out[LABELS_KEY] = json.dumps(names)
    problem = getattr(getattr(model, "config", None), "problem_type", None)  # a plain nn.Module has no config
    if task_type_for(model) == "SEQ_CLS" and problem in PROBLEMS:
        out[PROBLEM_KEY] = problem
    pooling = pooling_of(model)
    if pooling is not None:
        out[POOLING_KEY] = pooling
    for provider in METADATA:
        out.update(provider(model, name))
    return out


def class_names_of(model: nn.Module) -> list[str] | None:
    """A sequence classifier's class names (a token classifier's tags) by id from its config (id2label), or None
    for another model or for transformers' default names."""
    config = getattr(model, "config", None)
    if task_type_for(model) not in ("SEQ_CLS", "TOKEN_CLS") or config is None:
        return None
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(len(id2label))]
    return None if names == [f"LABEL_{i}" for i in range(len(names))] else names


def name_classes(model: nn.Module, names: list[str]) -> None:
    """Put a classifier's class names in its config (id2label, label2id), as transformers keeps them: a saved
    adapter's metadata (`file_metadata`) and a merged model's config.json carry them."""
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {n: i for i, n in enumerate(names)}


def adapter_class_names(path: str | os.PathLike) -> list[str] | None:
    """The class names a classifier's adapter folder recorded (`file_metadata`), or None."""
    weights = Path(path) / WEIGHTS_NAME
    if not weights.is_file():
        return None
    raw = safetensors_metadata(weights).get(LABELS_KEY)
    try:
        names = json.loads(raw) if raw else None
    except ValueError:
        return None
    return [str(n) for n in names] if isinstance(names, list) else None


def adapter_problem(path: str | os.PathLike) -> str | None:
    """What a classifier's adapter folder predicts, as its metadata says: "regression", "multi_label_classification"
    (transformers' problem_type), else None (one class per text, or a reward model's score)."""
    weights = Path(path) / WEIGHTS_NAME
    if not weights.is_file():
        return None
    problem = safetensors_metadata(weights).get(PROBLEM_KEY)
    return problem if problem in PROBLEMS else None


def adapter_pooling(path: str | os.PathLike) -> str | None:
    """How an embedding model's adapter folder (task_type FEATURE_EXTRACTION) pools, as its metadata says; None for
    any other folder, or one that does not say (PEFT's own files)."""
    path = Path(path)
    weights = path / WEIGHTS_NAME
    if path.is_file() or read_config_json(path).get("task_type") != "FEATURE_EXTRACTION" or not weights.is_file():
        return None
    pooling = safetensors_metadata(weights).get(POOLING_KEY)
    return pooling if pooling in POOLINGS else None


def after_load(model: nn.Module, path: Path) -> None:
    for hook in LOAD_HOOKS:
        hook(model, path)


def file_config(model: nn.Module, info: AdapterInfo) -> LoraConfig:
    """The adapter's LoraConfig as the file records it: targets that re-select exactly its modules, the base
    model's name and the task type filled in where unset."""
    targets = targets_for_file(model, info.config, info.modules) if info.modules else []  # [] : parameters only
    config = info.config.replace(targets=targets)
    if config.targets != info.config.targets and isinstance(config.targets, str):
        config = config.replace(layers=None, layers_pattern=None)
    if config.base_model is None:
        config = config.replace(
            base_model=getattr(getattr(model, "config", None), "_name_or_path", None) or None
        )
    if config.task_type is None:
        config = config.replace(task_type=task_type_for(model))
    return config


def targets_for_file(model: nn.Module, config: LoraConfig, modules: list[str]) -> str | list[str]:
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
