"""Adapters on a weight that the model ties: the output head that shares the input embedding's weight (SmolLM2,
Llama 3.2, Gemma, GPT-2). PEFT's `ensure_weight_tying`.

With `LoraConfig(ensure_weight_tying=True)`, an adapter that adapts or saves the embedding or the head gives both
one update, as the model gives both one weight:
- LoRA: the embedding holds the adapter (A: r×vocab, B: dim×r, PEFT's lora_embedding_A/B). The head's adapter
  (`TiedAdapter`) has no tensors of its own: A_head = B_embᵀ and B_head = A_embᵀ, views of the embedding's, so
  ΔW_head = s·A_embᵀ·B_embᵀ = ΔE and one gradient trains both. Moving the model (`.to`) or copying it keeps them
  one (PEFT gives the head separate parameters that share storage, which a move or a copy parts).
- modules_to_save: the head's copy holds the embedding's copy's weight.
Merging writes ΔE once into the shared weight, so the merged model stays tied (`tie_word_embeddings` stays true,
and its checkpoint and GGUF hold one tensor). Without the setting (PEFT's default) each module gets its own update,
and merging unties them (lorakit.control), which `inject` warns about.

Files: PEFT writes the head's tensors too (equal to the embedding's, transposed); lorakit writes them, and a load
checks that they are the embedding's (`check_file`).
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import AdapterError, TargetError
from lorakit.layers import LoraAdapter, LoraLayer, Variant
from lorakit.saved import SavedModule
from lorakit.token_rows import TokenRows
from lorakit.walk import base_modules

_PEFT_NAMES = ("embed_tokens", "lm_head")  # the names by which PEFT finds what to tie
_INITS = (
    "default",
    "gaussian",
    "random",
)  # starts that a view can share (the others compute each layer's own)
_SHARED = "shared"  # a merge record: the embedding's merge wrote the update into the one weight


class Tying(NamedTuple):
    """What `plan` decided: the LoRA modules and the modules saved whole (each with the tied head last), and the
    (embedding, head) pair whose LoRA, or whose saved copy, is one."""

    names: list[str]
    saved: list[str]
    lora: tuple[str, str] | None = None
    copy: tuple[str, str] | None = None


def tied_pair(model: nn.Module) -> tuple[str, str] | None:
    """(input embedding, output head) module names where the head's weight is the embedding's, else None."""
    get_in, get_out = (
        getattr(model, "get_input_embeddings", None),
        getattr(model, "get_output_embeddings", None),
    )
    if not (callable(get_in) and callable(get_out)):
        return None
    try:
        emb, head = get_in(), get_out()
    except (NotImplementedError, AttributeError):
        return None
    if emb is None or head is None:
        return None
    weight = getattr(base_module(emb), "weight", None)
    if weight is None or getattr(base_module(head), "weight", None) is not weight:
        return None
    names = {id(m): n for n, m in base_modules(model) if n}
    e, h = names.get(id(emb)), names.get(id(head))
    return (e, h) if e and h else None


def base_module(module: nn.Module) -> nn.Module:
    """The model's own module behind lorakit's wrappers (a LoRA layer, a saved copy's wrapper, token rows)."""
    while True:
        if isinstance(module, SavedModule):
            module = module.original_module
        elif isinstance(module, (LoraLayer, TokenRows)):
            module = module.base_layer
        else:
            return module


def plan(
    model: nn.Module,
    config: LoraConfig,
    names: Sequence[str],
    saved: Sequence[str],
    *,
    plain: bool = True,
    warn: bool = True,
) -> Tying:
    """Where `config` ties the adapter on `model`: the LoRA modules `names` and the saved modules `saved` with the
    embedding added and the head put last. `plain`: the adapter's variant is plain LoRA. Raises TargetError for
    what cannot be tied; `warn`: warn (as PEFT does) where tying was asked for and there is nothing to tie, or
    where the model ties and the adapter does not."""
    names, saved = list(names), list(saved)
    pair = tied_pair(model)
    touched = pair is not None and any(m in pair for m in [*names, *saved])
    if not config.ensure_weight_tying:
        if touched and warn:
            which = next(m for m in [*names, *saved] if m in pair)
            warnings.warn(
                f"{pair[1]!r} shares its weight with {pair[0]!r}, and the adapter gives {which!r} an update of its "
                "own: merging unties them; ensure_weight_tying=True gives both one update",
                stacklevel=3,
            )
        return Tying(names, saved)
    if pair is None or not touched:
        if warn:
            why = (
                f"{type(model).__name__} does not tie its output head to its input embedding"
                if pair is None
                else f"the adapter neither adapts nor saves {pair[0]!r} or {pair[1]!r}"
            )
            warnings.warn(f"ensure_weight_tying: {why}; nothing to tie", stacklevel=3)
        return Tying(names, saved)
    emb, head = pair
    in_lora, in_saved = emb in names or head in names, emb in saved or head in saved
    if in_lora and in_saved:
        raise TargetError(
            f"ensure_weight_tying: {emb!r} and {head!r} share one weight; adapt it with LoRA or save it whole, not both"
        )
    if in_lora:
        _check_lora(config, emb, head, plain)
        names = [n for n in names if n not in pair] + [emb, head]
    else:
        held = [m for m in pair if isinstance(model.get_submodule(m), LoraLayer)]
        if held:
            raise TargetError(
                f"ensure_weight_tying: {held[0]!r} holds other adapters' LoRA; a tied copy saved whole cannot sit "
                "over it (delete those adapters first, or save it without ensure_weight_tying)"
            )
        saved = [n for n in saved if n not in pair] + [emb, head]
    order = {n: i for i, (n, _) in enumerate(model.named_modules(remove_duplicate=False))}
    names.sort(key=lambda n: order.get(n, len(order)))
    saved.sort(key=lambda n: order.get(n, len(order)))
    for kept in (names, saved):  # the head last: its adapter is made from the embedding's
        if head in kept:
            kept.remove(head)
            kept.append(head)
    return Tying(names, saved, pair if in_lora else None, pair if in_saved else None)


def as_peft_ties(config: LoraConfig) -> LoraConfig:
    """A file's `config` as PEFT reads it: PEFT ties only where a target or a saved module is named embed_tokens or
    lm_head (GPT-2's `wte` alone stays untied), so elsewhere ensure_weight_tying means nothing. lorakit's own files
    name the head."""
    if config.ensure_weight_tying and not _peft_ties(config):
        return config.replace(ensure_weight_tying=False)
    return config


def _peft_ties(config: LoraConfig) -> bool:
    named = [m.rsplit(".", 1)[-1] for m in config.modules_to_save or []]
    if isinstance(config.targets, str):
        return any(n in _PEFT_NAMES for n in named) or any(
            re.fullmatch(config.targets, n) for n in _PEFT_NAMES
        )
    return any(n in _PEFT_NAMES for n in [*named, *(t.rsplit(".", 1)[-1] for t in config.targets)])


def _check_lora(config: LoraConfig, emb: str, head: str, plain: bool) -> None:
    why = None
    if not plain or config.use_dora or config.lora_bias or config.alora_invocation_tokens:
        why = "plain LoRA adapters only (no DoRA, lora_bias, aLoRA or other variants)"
    elif config.init not in _INITS:
        why = f"adapters that start from init {', '.join(map(repr, _INITS))}; init={config.init!r} starts each layer on its own"
    elif config.rank_for(head) != config.rank_for(emb) or config.scaling_for(head) != config.scaling_for(emb):
        why = (
            f"one rank and scaling for both; rank_pattern or alpha_pattern gives {head!r} others than {emb!r}"
        )
    if why:
        raise TargetError(f"ensure_weight_tying ties {why}")


# --------------------------------------------------------------------------------------------------------------
# The head's LoRA: a view of the embedding's
# --------------------------------------------------------------------------------------------------------------


class TiedVariant(Variant):
    """Plain LoRA whose tensors are the embedding's (transposed). Merging into the weight the head still shares with
    the embedding adds nothing: the embedding's merge writes the one update there."""

    name = "tied"
    label = "LoRA tied to the input embedding"

    def fused_factors(self, adapter: LoraAdapter) -> tuple[torch.Tensor, torch.Tensor]:
        return adapter.lora_A, adapter.lora_B  # the embedding's, transposed: plain LoRA's forward

    def merge(self, layer: LoraLayer, adapter: LoraAdapter, weight: float, w: torch.Tensor) -> object:
        if _shares_weight(layer, adapter):
            return _SHARED
        return super().merge(layer, adapter, weight, w)

    def unmerge(self, layer: LoraLayer, adapter: LoraAdapter, weight: float, state: object) -> None:
        if state != _SHARED:
            super().unmerge(layer, adapter, weight, state)


class TiedAdapter(nn.Module):
    """The head's adapter `name`: A = B_embᵀ, B = A_embᵀ, views of the embedding layer's adapter `name` (not a
    submodule: its tensors are saved, trained and moved once, with the embedding)."""

    def __init__(self, source: LoraLayer, name: str, dropout: float) -> None:
        super().__init__()
        self.__dict__["source"] = source
        self.name = name
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.variant = TiedVariant()
        self.base_residual = None
        self.on_remove = None
        self.start = None

    @property
    def of(self) -> LoraAdapter:
        return self.source.adapters[self.name]

    @property
    def lora_A(self) -> torch.Tensor:
        return self.of.lora_B.t()

    @property
    def lora_B(self) -> torch.Tensor:
        return self.of.lora_A.t()

    @property
    def r(self) -> int:
        return self.of.r

    @property
    def alpha(self) -> float:
        return self.of.alpha

    @property
    def scaling(self) -> float:
        return self.of.scaling

    @property
    def init_config(self) -> LoraConfig | None:
        return self.of.init_config

    adapter_params = LoraAdapter.adapter_params  # its variant's tensor names, read through the views above

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:.4g}, tied to the input embedding's adapter {self.name!r}"


def add_tied_adapter(model: nn.Module, tie: Tying, name: str, dropout: float) -> None:
    """Give the head of `tie.lora` (already a LoraLayer) adapter `name` as a view of the embedding's."""
    emb, head = tie.lora
    layer = model.get_submodule(head)
    layer.adapters[name] = TiedAdapter(model.get_submodule(emb), name, dropout)
    layer.row_cache = None


def _shares_weight(layer: LoraLayer, adapter: TiedAdapter) -> bool:
    source = adapter.source
    return layer.handler.weight(layer.base_layer) is source.handler.weight(source.base_layer)


def merges_as_one(layers: Sequence[LoraLayer]) -> bool:
    """Whether layers that share one weight merge one update into it: an embedding and a head whose adapters to
    merge are exactly the views of the embedding's, with the same weights (then nothing needs untying)."""
    if len(layers) != 2:
        return False
    for head, emb in (layers, layers[::-1]):
        todo = head._to_merge()
        if todo and all(
            isinstance(head.adapters[n], TiedAdapter) and head.adapters[n].source is emb for n, _ in todo
        ):
            return todo == emb._to_merge()
    return False


# --------------------------------------------------------------------------------------------------------------
# The head's saved copy: the embedding's copy's weight
# --------------------------------------------------------------------------------------------------------------


def add_tied_copy(model: nn.Module, tie: Tying, name: str) -> None:
    """Give the head of `tie.copy` a copy for adapter `name` that holds the embedding's copy's weight (added
    before)."""
    emb, head = tie.copy
    source = model.get_submodule(emb).modules_to_save[name]
    wrapper = model.get_submodule(head)
    if not isinstance(wrapper, SavedModule):
        wrapper = SavedModule(wrapper)
        parent, _, child = head.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, wrapper)
    shared = base_module(wrapper.original_module).weight
    clone = copy.deepcopy(wrapper.original_module, memo={id(shared): source.weight})
    for p in clone.parameters():
        p.requires_grad_(True)
    wrapper.modules_to_save[name] = clone


# --------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------


def check_file(
    source: str, head: str, emb: str, found: dict[str, torch.Tensor], of_emb: dict[str, torch.Tensor]
) -> None:
    """A file's tensors of the tied head (adapter attribute or state key -> tensor), beside the embedding's: each
    must be the embedding's (transposed for LoRA), as PEFT writes them. None present is fine: they follow."""
    for key, t in found.items():
        want = {"lora_A": "lora_B", "lora_B": "lora_A"}.get(key)
        mine = of_emb.get(want if want else key)
        if mine is None:
            continue
        mine = mine.t() if want else mine
        if tuple(t.shape) != tuple(mine.shape) or not torch.equal(t, mine.to(t.dtype)):
            raise AdapterError(
                f"{source}: ensure_weight_tying, but the file's {head}.{key} is not {emb}'s "
                f"{'transposed ' + want if want else key}: the adapters of the tied modules differ"
            )


def tied_heads(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """In a file's tensors (PEFT keys): head module -> embedding module, where the head's A and B are the
    embedding's B and A transposed (an adapter saved with ensure_weight_tying)."""
    a_suffix, emb_suffix = ".lora_A.weight", ".lora_embedding_A"
    embeddings = [k[: -len(emb_suffix)] for k in tensors if k.endswith(emb_suffix)]
    out = {}
    for k in tensors:
        if not k.endswith(a_suffix):
            continue
        head = k[: -len(a_suffix)]
        A, B = tensors[k], tensors.get(head + ".lora_B.weight")
        for e in embeddings:
            eA, eB = tensors[e + emb_suffix], tensors.get(e + ".lora_embedding_B")
            same_shapes = B is not None and eB is not None and A.shape == eB.T.shape and B.shape == eA.T.shape
            if same_shapes and torch.equal(A, eB.T) and torch.equal(B, eA.T):
                out[head] = e
    return out


def retie(tensors: dict[str, torch.Tensor], heads: dict[str, str]) -> None:
    """Write each head's A and B as its embedding's B and A transposed (after a combination made each anew)."""
    for head, e in heads.items():
        tensors[head + ".lora_A.weight"] = tensors[e + ".lora_embedding_B"].T.contiguous()
        tensors[head + ".lora_B.weight"] = tensors[e + ".lora_embedding_A"].T.contiguous()
