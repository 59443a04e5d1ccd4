"""Classifiers' heads kept beside a causal LM, so that one model in memory serves generation adapters and
classifier adapters (reward models, text classifiers, token classifiers) together.

    keep_heads_beside(model)                  # a causal LM now takes SEQ_CLS adapters, heads kept apart
    head = read_head(model, "out/reward")     # the adapter's head: its own Linear, class names, pad id
    load_adapter(model, "out/reward", "rm")   # its LoRA pairs, on the shared backbone
    scores = head_scores(model, head, [[1, 2, 3], [4, 5]])   # (2, outputs), float32; route "rm" first

A classifier adapter (PEFT's task_type SEQ_CLS, as `lorakit train --objective reward|classify` saves one; or
TOKEN_CLS, a token classifier's, `--objective token_classify`) adapts the same backbone as a causal LM's adapter
(transformers' `...ForSequenceClassification.model` is `...ForCausalLM.model`) and saves its head whole
(modules_to_save: "score"). On a model marked here, a load
takes the LoRA pairs and leaves the head to `read_head` (`lorakit.saved_plan`); unmarked, such a load is refused,
as a head the model lacks would silently be lost. `head_scores` computes what the classifier's own forward does:
the backbone's last hidden state at each row's last token that is not the pad token (transformers' pooling), times
the head, in float32; `token_scores` a token classifier's, the head on every token's last hidden state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from lorakit.errors import AdapterError, AdapterFileError
from lorakit.formats import (
    PREFIX,
    WEIGHTS_NAME,
    adapter_class_names,
    adapter_problem,
    read_config_json,
    read_tensors,
)

MARK = "_lorakit_heads_beside"
TASKS = ("SEQ_CLS", "TOKEN_CLS")
"""The task types whose adapters are classifiers with a head: a sequence classifier's, a token classifier's."""


def keep_heads_beside(model: nn.Module) -> None:
    """Let `model` (a causal LM) take classifier adapters: their LoRA pairs load, their heads are left to
    `read_head`."""
    model.__dict__[MARK] = True


def heads_beside(model: nn.Module) -> bool:
    return bool(model.__dict__.get(MARK))


@dataclass(frozen=True)
class Head:
    """A classifier adapter's head: one linear layer on the backbone's pooled hidden state."""

    module: str
    """Its name in the classifier ("score")."""
    weight: torch.Tensor
    """(outputs, hidden), float32, on the model's device."""
    bias: torch.Tensor | None
    classes: tuple[str, ...]
    """The name of each output (the adapter's recorded class names, else transformers' LABEL_i)."""
    problem: str | None = None
    """"regression" for a regression's head (one output, a number to predict), else None."""
    per_token: bool = False
    """A token classifier's head (TOKEN_CLS): on every token, its outputs the tags."""

    @property
    def outputs(self) -> int:
        return int(self.weight.shape[0])


def backbone_tensors(
    model: nn.Module, task_type: str | None, tensors: dict[str, torch.Tensor], path: Path
) -> dict[str, torch.Tensor]:
    """An embedding model's adapter (task_type FEATURE_EXTRACTION) names the bare model's modules
    (`base_model.model.layers.0...`); on a causal LM that keeps heads beside it, the same modules are its body's
    (`base_model.model.model.layers.0...`): the tensors keyed so. Any other adapter or model: `tensors` as they are;
    on a model with a head that does not keep heads beside it, AdapterError in one line saying how to load it."""
    prefix = getattr(model, "base_model_prefix", "")
    body = getattr(model, prefix, None) if prefix else None
    if task_type != "FEATURE_EXTRACTION" or not isinstance(body, nn.Module):
        return tensors
    inner = f"{PREFIX}{prefix}."
    if all(k.startswith(inner) for k in tensors if k.startswith(PREFIX)):  # saved from a model with the head
        return tensors
    if not heads_beside(model):
        raise AdapterError(
            f"{path}: an embedding model's adapter (task_type FEATURE_EXTRACTION), of the model without a head; load "
            f"the base so, lorakit.load_model(..., bare=True), not as a {type(model).__name__} (lorakit serve "
            "embeds with it at /v1/embeddings)"
        )
    return {
        k if k.startswith(inner) or not k.startswith(PREFIX) else inner + k[len(PREFIX) :]: t
        for k, t in tensors.items()
    }


def is_classifier(path: str | os.PathLike) -> bool:
    """Whether `path` is an adapter folder of a classifier (task_type SEQ_CLS, or TOKEN_CLS)."""
    path = Path(path)
    return path.is_dir() and read_config_json(path).get("task_type") in TASKS


def head_modules(model: nn.Module, modules_to_save: list[str] | None, keys) -> list[str]:
    """The top-level modules a file saves whole that `model` lacks and the file holds tensors for: its heads."""
    return [
        name
        for name in modules_to_save or []
        if "." not in name
        and not hasattr(model, name)
        and any(k.startswith(f"{PREFIX}{name}.") for k in keys)
    ]


def read_head(model: nn.Module, path: str | os.PathLike, *, allow_pickle: bool = False) -> Head | None:
    """The head of classifier adapter `path`, to go beside `model`'s backbone; None for any other adapter.
    AdapterError in one line for a head that is not one linear layer of the model's width, or is missing."""
    path = Path(path)
    if not is_classifier(path):
        return None
    config = read_config_json(path)
    saved = config.get("modules_to_save")
    tensors = _head_tensors(model, path, saved if isinstance(saved, list) else [], allow_pickle)
    names = head_modules(model, saved if isinstance(saved, list) else None, tensors)
    if not names:
        raise AdapterError(
            f"{path}: a classifier's adapter (task_type {config.get('task_type')}) without its head (modules_to_save "
            '"score" with its tensors): nothing to classify with'
        )
    if len(names) > 1:
        raise AdapterError(f"{path}: the file holds {len(names)} heads ({names}); a classifier has one")
    (name,) = names
    own = {
        k[len(PREFIX) + len(name) + 1 :]: t for k, t in tensors.items() if k.startswith(f"{PREFIX}{name}.")
    }
    hidden = _hidden_size(model)
    weight, bias = own.pop("weight", None), own.pop("bias", None)
    if own or weight is None or weight.dim() != 2 or weight.shape[1] != hidden:
        shapes = {
            k: tuple(t.shape) for k, t in {"weight": weight, "bias": bias, **own}.items() if t is not None
        }
        raise AdapterError(
            f"{path}: its head {name!r} is not one linear layer from the model's {hidden}-wide hidden state to the "
            f"outputs (it holds {shapes}); a decoder LM's classifier head (score) is"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise AdapterError(f"{path}: its head's bias has shape {tuple(bias.shape)}, not ({weight.shape[0]},)")
    outputs = int(weight.shape[0])
    classes = adapter_class_names(path) or [f"LABEL_{i}" for i in range(outputs)]
    if len(classes) != outputs:
        raise AdapterError(f"{path}: its head has {outputs} outputs but it names {len(classes)} classes")
    device = next(model.parameters()).device
    return Head(
        name,
        weight.detach().to(device, torch.float32),
        None if bias is None else bias.detach().to(device, torch.float32),
        tuple(classes),
        adapter_problem(path),
        config.get("task_type") == "TOKEN_CLS",
    )


def _head_tensors(
    model: nn.Module, path: Path, saved: list[str], allow_pickle: bool
) -> dict[str, torch.Tensor]:
    """The file's tensors of the top-level modules it saves whole that `model` lacks: from a safetensors file those
    alone (the load that planned the LoRA pairs read and checked the whole file already), else all of them."""
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        return read_tensors(path, allow_pickle)
    prefixes = tuple(f"{PREFIX}{n}." for n in saved if "." not in n and not hasattr(model, n))
    try:
        with safe_open(str(weights), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefixes)}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own SafetensorError
        raise AdapterFileError(f"{weights}: not a readable safetensors file ({e})") from None


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "hidden_size", None)
    if size is None:
        raise AdapterError(
            f"a classifier's head goes beside a transformers model with a hidden_size, not {type(model).__name__}"
        )
    return int(size)


def pooled_positions(ids: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """Each row's position that a sequence classifier reads: the rightmost token that is not the pad token
    (transformers' rule, with left or right padding; 0 for a row of pad tokens only), or the last one where the
    model has no pad token."""
    if pad_id is None:
        return torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device)
    positions = torch.arange(ids.shape[1], device=ids.device)
    return (positions * (ids != pad_id)).argmax(-1)


@torch.inference_mode()
def head_scores(model: nn.Module, head: Head, rows: list[list[int]], pad_id: int | None) -> torch.Tensor:
    """The head's outputs (rows, outputs), float32, for token-id rows, as the classifier's forward computes them:
    the rows right-padded with `pad_id` into one batch through the backbone (`model.base_model`) with whatever
    adapter is active on it, pooled (`pooled_positions`), then the head. `pad_id` is the pad id the classifier was
    trained with (its config's: the tokenizer's)."""
    if not rows or any(not r for r in rows):
        raise ValueError("head_scores needs non-empty token-id rows")
    if pad_id is None and len(rows) > 1:
        raise ValueError("rows of a model without a pad token are scored one at a time")
    device = head.weight.device
    ids, mask = padded(rows, pad_id, device)
    hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    # a row's pooled position comes from its own tokens: padding only ever follows them
    at = torch.stack([pooled_positions(ids[i : i + 1, : len(r)], pad_id)[0] for i, r in enumerate(rows)])
    pooled = hidden[torch.arange(len(rows), device=device), at].float()
    return nn.functional.linear(pooled, head.weight, head.bias)


@torch.inference_mode()
def token_scores(
    model: nn.Module, head: Head, rows: list[list[int]], pad_id: int | None
) -> list[torch.Tensor]:
    """A token classifier's head outputs for token-id rows, one (tokens, tags) float32 tensor per row, as the
    token classifier's forward computes them: the rows right-padded into one batch through the backbone
    (`model.base_model`) with whatever adapter is active on it, the head on every token's last hidden state."""
    if not rows or any(not r for r in rows):
        raise ValueError("token_scores needs non-empty token-id rows")
    ids, mask = padded(rows, pad_id, head.weight.device)
    hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    logits = nn.functional.linear(hidden.float(), head.weight, head.bias)
    return [logits[i, : len(r)] for i, r in enumerate(rows)]


def padded(
    rows: list[list[int]], pad_id: int | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token-id rows right-padded with `pad_id` (0 without one) into one batch."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id if pad_id is not None else 0, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)
