"""Which modules a `LoraConfig` selects. Pure functions over the model's modules (`lorakit.walk.base_modules`).

The matching rules are PEFT's, so that a config means the same module set in both tools:
- `targets` as a list: a module matches if its name equals an entry or ends with `.` + entry;
- `targets` as a string: a full regex match on the module name; "all-linear" means every linear layer
  (nn.Linear, GPT-2 Conv1D) except the output head;
- `exclude` the same way; `layers` keeps modules whose layer index (first number after `layers_pattern`) is listed.
"""

from __future__ import annotations

import difflib
import re

from torch import nn

from lorakit.config import ALL_LINEAR, LoraConfig
from lorakit.errors import TargetError
from lorakit.handlers import handler_for, supported_type_names
from lorakit.layers import LoraLayer
from lorakit.params import ParamLora
from lorakit.saved import SavedModule
from lorakit.task_types import CLASSIFICATION, pooling_of, task_heads, task_type_for
from lorakit.token_rows import TokenRows
from lorakit.walk import base_modules


def select_modules(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules `config` adapts, in model order. Raises `TargetError` if none, or if one is unsupported."""
    names = candidate_names(model)
    if config.targets == ALL_LINEAR:
        linear = set(all_linear_names(model))
        matched = [n for n in names if n in linear]
    else:
        matched = [n for n in names if _matches(config.targets, n)]
    matched = [n for n in matched if not _excluded(config, n)]
    if config.layers is not None:
        matched = [n for n in matched if layer_index(n, config.layers_pattern) in set(config.layers)]
    if not matched:
        raise TargetError(_no_match_message(model, config, names))
    modules = dict(base_modules(model))
    for n in matched:
        if handler_for(modules[n]) is None:
            raise TargetError(
                f"target {n!r} is a {type(modules[n]).__name__}, which LoRA cannot wrap "
                f"(supported: {supported_type_names()})"
            )
    return matched


def candidate_names(model: nn.Module) -> list[str]:
    """All module names, without the internals of existing LoRA layers (their base_layer and adapters)."""
    names = []
    inside = None  # "name." of the wrapper whose internals come next: named_modules walks a subtree in one piece
    for name, module in base_modules(model):
        if not name or (inside is not None and name.startswith(inside)):
            continue
        names.append(name)
        if isinstance(module, (LoraLayer, SavedModule, TokenRows, ParamLora)):
            inside = name + "."
    return names


def all_linear_names(model: nn.Module) -> list[str]:
    """Every linear layer (per the handler table) except the model's output head, or, in a classification model,
    its classification head (which the adapter saves whole instead, as in PEFT), or, in an embedding model
    (`mark_embedder`), the bare encoder's pooler (BERT's dense layer over [CLS], which lorakit's pooling of the last
    hidden states never reads: an adapter there would train nothing, and DDP refuses parameters without gradients)."""
    head = _output_head(model)
    task = task_type_for(model)
    heads = {id(_base(m)) for m in task_heads(model, task).values()} if task in CLASSIFICATION else set()
    pooler = getattr(model, "pooler", None) if pooling_of(model) is not None else None
    if isinstance(pooler, nn.Module):
        heads |= {id(_base(m)) for m in pooler.modules()}
    out = []
    for name in candidate_names(model):
        module = model.get_submodule(name)
        handler = handler_for(module)
        if handler is None or not handler.linear or id(_base(module)) in heads:
            continue
        if module is not head and _base(module) is not head:
            out.append(name)
    return out


def select_saved(
    model: nn.Module,
    names: list[str],
    *,
    strict: bool = True,
    what: str = "modules_to_save",
    legacy: bool = False,
) -> list[str]:
    """The modules `names` select to save whole (modules_to_save), in model order. PEFT's rule (since peft 0.22): a
    module is selected when its full name is one of `names` or ends with "." + one of them (so "norm" selects
    `model.norm`, not `input_layernorm`; "lm_head" the head). With `strict`, a name that matches nothing is an
    error. `legacy`: also select by a bare suffix (`*norm`), as peft 0.21 and earlier did."""
    found: set[str] = set()
    candidates = candidate_names(model)
    for want in names:
        hits = [n for n in candidates if n == want or n.endswith("." + want) or (legacy and n.endswith(want))]
        if not hits and strict:
            near = difflib.get_close_matches(want, sorted({n.rsplit(".", 1)[-1] for n in candidates}), n=3)
            raise TargetError(
                f"{what}: {want!r} matches no module of {type(model).__name__}"
                + (f"; nearest module names: {', '.join(near)}" if near else "")
            )
        found.update(hits)
    return [n for n in candidates if n in found]


def layer_index(name: str, layers_pattern: str | list[str] | None) -> int | None:
    """The layer number in `name`: first number after `layers_pattern` (or after any segment, if None)."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        m = None
        for pattern in patterns:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if m:
                break
    return int(m.group("idx")) if m else None


def _matches(spec: str | list[str], name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith("." + key) for key in spec)


def _excluded(config: LoraConfig, name: str) -> bool:
    return bool(config.exclude) and _matches(config.exclude, name)


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return _base(head) if head is not None else None


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLayer) else module


def _no_match_message(model: nn.Module, config: LoraConfig, names: list[str]) -> str:
    wanted = [config.targets] if isinstance(config.targets, str) else list(config.targets)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if handler_for(model.get_submodule(n)) is not None})
    near: list[str] = []
    for w in wanted:
        near += difflib.get_close_matches(w.rsplit(".", 1)[-1], leaves, n=3, cutoff=0.4)
    near = list(dict.fromkeys(near)) or leaves[:8]
    extra = (
        f" (after exclude={config.exclude!r}, layers={config.layers!r})"
        if config.exclude or config.layers
        else ""
    )
    listed = ""
    if isinstance(config.targets, str) and "," in config.targets:  # a list written as one string: a regex
        parts = [p.strip() for p in config.targets.split(",")]
        listed = f" (a string is one regex; a list of names is written [{', '.join(parts)}])"
    return (
        f"targets {config.targets!r} matched no module in {type(model).__name__}{extra}{listed}; "
        f"nearest adaptable module names: {', '.join(near) or 'none'}"
    )
