"""The tensors of an adapter file beyond its LoRA pairs, planned before the model changes: the modules it saves
whole (PEFT's modules_to_save), the embedding rows it trains alone (trainable_token_indices) and the parameters it
adapts (target_parameters). `lora_format` plans the LoRA pairs and applies both, all or nothing. Without a model,
`saved_tensors` and `token_tensors` pick a file's whole modules and token rows out (describe, combine).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lorakit.classifier_heads import TASKS, head_modules, heads_beside
from lorakit.config import LoraConfig
from lorakit.errors import AdapterError, TargetError
from lorakit.formats import PREFIX
from lorakit.inject import param_plan, token_plan
from lorakit.params import ParamLora, factor_shapes, file_keys
from lorakit.saved import check_targets, original
from lorakit.targeting import select_modules, select_saved
from lorakit.tying import check_file
from lorakit.tying import plan as tie_plan

TOKEN_KEY = "token_adapter.trainable_tokens_delta"  # PEFT's key for an adapter's token rows


def plan_saved(
    model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor], path: Path
) -> tuple[LoraConfig, list[tuple[str, str, torch.Tensor]], dict[str, torch.Tensor]]:
    """The modules the file saves whole (modules_to_save): (config naming exactly those modules, their tensors,
    the other tensors). PEFT lists head names the model may lack (["classifier", "score"]), so names that match
    nothing are skipped; a matched module whose tensors are missing or misshapen is an error."""
    if (
        config.modules_to_save is None
        and config.trainable_token_indices is None
        and not config.target_parameters
    ):
        return config, [], tensors
    try:
        lora_modules = (
            [] if config.target_parameters and not config.targets else select_modules(model, config)
        )
        names = config.modules_to_save or []
        modules = select_saved(model, names, strict=False)
        # a file of peft <= 0.21, which selected "norm" as any *norm: the modules it holds tensors for
        legacy = [
            m
            for m in select_saved(model, names, strict=False, legacy=True)
            if m not in modules and any(k.startswith(f"{PREFIX}{m}.") for k in tensors)
        ]
        if legacy:
            modules = select_saved(model, [*modules, *legacy], strict=False)  # in model order
        tie = tie_plan(model, config, lora_modules, modules, warn=False)
        lora_modules, modules = tie.names, tie.saved
        check_targets(model, modules, lora_modules)
        tokens, tied = token_plan(model, config, lora_modules, modules)
        params = param_plan(model, config, lora_modules, [*modules, *tokens, *tied])
    except TargetError as e:
        raise AdapterError(f"{path}: adapter does not fit {type(model).__name__}: {e}") from None
    rest = dict(tensors)
    for head in _check_heads(model, config, modules, tensors, path):  # kept beside: `classifier_heads`
        rest = {k: t for k, t in rest.items() if not k.startswith(f"{PREFIX}{head}.")}
    saved: list[tuple[str, str, torch.Tensor]] = []
    for m, ids in tokens.items():
        key = f"{PREFIX}{m}.{TOKEN_KEY}"
        t = rest.pop(key, None)
        width = original(model.get_submodule(m)).weight.shape[1]
        if t is None:
            raise AdapterError(
                f"{path}: trainable_token_indices names rows of {m!r} but the file lacks {key}"
            )
        if tuple(t.shape) != (len(ids), width):
            raise AdapterError(
                f"{path}: {key} has shape {tuple(t.shape)}, but {len(ids)} token ids of a {width}-wide {m!r} "
                f"need {(len(ids), width)}"
            )
        saved.append((m, TOKEN_KEY, t))
    for m, names in params.items():
        owner = model.get_submodule(m)
        owner = owner.base_layer if isinstance(owner, ParamLora) else owner
        transposed = bool(getattr(owner, "is_transposed", False))
        r = config.rank_for(m)
        for p, where in file_keys(m, names).items():
            shapes = factor_shapes(getattr(owner, p), r, transposed)
            for which, shape in zip(("lora_A", "lora_B"), shapes, strict=True):
                key = f"{PREFIX}{where}.{which}.weight"
                t = rest.pop(key, None)
                if t is None:
                    raise AdapterError(f"{path}: target_parameters adapts {m}.{p} but the file lacks {key}")
                if tuple(t.shape) != tuple(shape):
                    raise AdapterError(
                        f"{path}: {key} has shape {tuple(t.shape)}, but {m}.{p} {tuple(getattr(owner, p).shape)} "
                        f"with r={r} needs {shape}"
                    )
                saved.append((m, f"param:{p}:{which}", t))
    of_emb: dict[str, torch.Tensor] = {}
    for m in modules:
        tied_head = tie.copy is not None and m == tie.copy[1]
        for k, v in original(model.get_submodule(m)).state_dict().items():
            key = f"{PREFIX}{m}.{k}"
            t = rest.pop(key, rest.pop(f"{m}.{k}", None))
            if tied_head:  # the embedding's copy (ensure_weight_tying): the file's, if any, must equal it
                check_file(str(path), m, tie.copy[0], {} if t is None else {k: t}, of_emb)
                continue
            if tie.copy is not None and m == tie.copy[0]:
                of_emb[k] = t if t is not None else v
            if t is None:
                raise AdapterError(f"{path}: modules_to_save names {m!r} but the file lacks its tensor {key}")
            if tuple(t.shape) != tuple(v.shape):
                raise AdapterError(
                    f"{path}: {key} has shape {tuple(t.shape)} but {type(model).__name__}.{m}.{k} has "
                    f"{tuple(v.shape)} (a head for another number of labels, or another vocabulary?)"
                )
            saved.append((m, k, t))
    if config.modules_to_save is not None:
        config = config.replace(modules_to_save=modules)
    return config, saved, rest


def saved_tensors(config: LoraConfig, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The file's tensors of the modules it saves whole (modules_to_save), without a model: module name ->
    {tensor name within the module: tensor}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        k = key.removeprefix(PREFIX)
        for w in config.modules_to_save or []:
            tail = _after(k, w)
            if tail is not None and "lora_" not in tail:
                out.setdefault(k[: -len(tail) - 1], {})[tail] = t
                break
    return out


def token_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's token rows (trainable_token_indices): module name -> (n, dim) rows."""
    suffix = "." + TOKEN_KEY
    return {k.removeprefix(PREFIX)[: -len(suffix)]: t for k, t in tensors.items() if k.endswith(suffix)}


def _after(key: str, module: str) -> str | None:
    """The tensor name in `key` after the first module whose name ends with `module` (PEFT's rule), or None."""
    i = key.find(module + ".")
    return key[i + len(module) + 1 :] if i >= 0 else None


def _check_heads(
    model: nn.Module, config: LoraConfig, modules: list[str], tensors: dict[str, torch.Tensor], path: Path
) -> list[str]:
    """A module the file saves whole at the model's top level (a classifier's head: "score") that the model lacks
    is an error, not a tensor left out: without it a reward model's adapter on a causal LM would run the LM head
    and answer nonsense. Names that match nothing and have no tensors (PEFT lists both "classifier" and "score")
    are fine. On a causal LM that keeps classifiers' heads beside it (`lorakit.classifier_heads`), a classifier's
    heads are no error: returns their names, whose tensors the load leaves out."""
    heads = head_modules(model, config.modules_to_save, tensors)
    if heads and config.task_type in TASKS and heads_beside(model):
        return heads
    for name in config.modules_to_save or []:
        if any(m == name or m.endswith("." + name) for m in modules):
            continue
        if any(k.startswith(f"{PREFIX}{name}.") for k in tensors):
            hint = {
                "SEQ_CLS": f": it is a {config.task_type} adapter (a sequence classifier's, e.g. a reward model's); "
                "load the base as one, lorakit.load_model(..., num_labels=N)",
                "TOKEN_CLS": f": it is a {config.task_type} adapter (a token classifier's); load the base as one, "
                "lorakit.load_model(..., num_labels=N, per_token=True)",
            }.get(config.task_type, "")
            raise AdapterError(
                f"{path}: the file holds a trained {name!r} (modules_to_save), which {type(model).__name__} "
                f"lacks{hint}"
            )
    return []
