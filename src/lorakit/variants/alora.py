"""Activated LoRA (aLoRA; PEFT's `alora_invocation_tokens`): the adapter acts only from its invocation on.

    ids = tokenizer.encode("<|im_start|>assistant\\n", add_special_tokens=False)
    lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32, alora_invocation_tokens=ids))

In each row, the tokens before the last occurrence of the invocation sequence see the base model alone; the
adapter acts on the invocation's tokens and on everything after them. So the KV cache of the text before the
invocation is the base model's own: a pipeline that switches between the base and such adapters (an agent that
asks a checker adapter about the conversation so far) prefills that text once. A row without the invocation runs
as the base model. Merging is refused, as in PEFT (a merged weight acts on every token).

Where each row's invocation is: `Activation`, a forward pre-hook on the model's decoder (`base_model`), sees every
forward's input_ids and cache length, and keeps the rows' tokens so far:

* a forward from scratch (no cache, or an empty one: training, evaluation, a prompt's prefill) searches its own
  input_ids: exactly PEFT's forward;
* a forward that continues a cache this hook saw filled (generation's decode steps) searches the rows' whole
  history, so the adapter stays on after an invocation in the prompt, as in PEFT's generate;
* a forward that continues a cache the hook did not see filled (a different batch) searches its new tokens only.

Each aLoRA layer multiplies its update by the mask of its adapter's invocation, computed once per forward and
invocation (vectorised over the batch). The layers take the generic path, not the fused kernels; mixed-adapter
batches (`row_adapters`) run each aLoRA adapter on its rows with those rows' masks. Only linear layers take aLoRA
(as in PEFT). A forward with `inputs_embeds` and no input_ids cannot find an invocation: it runs the base alone
and warns, as PEFT does.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.control import register_folder_check, register_merge_guard
from lorakit.data.jsonl import DataError
from lorakit.data.tokenize import IGNORE
from lorakit.errors import AdapterError
from lorakit.handlers import Handler
from lorakit.layers import LoraAdapter, LoraLayer, Variant, register_variant
from lorakit.registry import lora_layers

log = logging.getLogger(__name__)

_KEY = "_lorakit_alora"  # model.__dict__ key of the model's Activation


@register_variant
class AloraVariant(Variant):
    name = "alora"
    label = "aLoRA"
    plain = False
    not_plain_because = "aLoRA acts only after its invocation tokens, which llama.cpp's LoRA pairs cannot express"

    def __init__(self, tokens: tuple[int, ...] = ()) -> None:
        self.tokens = tokens
        self.activation: Activation | None = None  # set by attach

    @classmethod
    def selects(cls, config: LoraConfig) -> bool:
        return config.alora_invocation_tokens is not None

    @classmethod
    def refusal(cls, handler: Handler) -> str | None:
        if handler.embedding or handler.feature_dim != -1:
            return "aLoRA adapts linear layers only (as in PEFT)"
        return None

    @classmethod
    def model_refusal(cls, model: nn.Module) -> str | None:
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            return "aLoRA is for decoder-only causal LMs (the invocation is searched in the decoder's input_ids)"
        return None

    @classmethod
    def create(cls, config: LoraConfig, module: str) -> AloraVariant:
        return cls(tuple(config.alora_invocation_tokens or ()))

    @classmethod
    def attach(cls, model: nn.Module, name: str) -> None:
        activation = model.__dict__.get(_KEY)
        if activation is None:
            activation = model.__dict__[_KEY] = Activation(model)
        for _, layer in lora_layers(model):
            if name in layer.adapters and isinstance(layer.adapters[name].variant, AloraVariant):
                layer.adapters[name].variant.activation = activation

    def forward(
        self, layer: LoraLayer, adapter: LoraAdapter, x: torch.Tensor, base_out: torch.Tensor
    ) -> torch.Tensor:
        y = super().forward(layer, adapter, x, base_out)
        if self.activation is None:
            raise AdapterError("aLoRA adapter is not attached to a model (add it with lorakit.inject)")
        mask = self.activation.mask(self.tokens)
        plan = layer.row_plan
        if plan is not None:  # a mixed batch runs this adapter on its own rows only
            name = next(n for n, a in layer.adapters.items() if a is adapter)
            rows = [i for i, n in enumerate(plan.names) if n == name]
            mask = mask[torch.tensor(rows, dtype=torch.long, device=mask.device)]
        if tuple(y.shape[: mask.dim()]) != tuple(mask.shape):
            if y.dim() != 2 or y.shape[0] != mask.numel():
                raise AdapterError(
                    f"aLoRA: a layer's output has shape {tuple(y.shape)}, which does not start with the "
                    f"(batch, tokens) {tuple(mask.shape)} of the decoder's last input_ids"
                )
            mask = mask.reshape(-1)
        return y * mask.unsqueeze(-1).to(device=y.device, dtype=y.dtype)


class Activation:
    """Each row's tokens so far, from a forward pre-hook on the model's decoder, and the masks they give."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.history: torch.Tensor | None = None  # (batch, tokens so far) token ids
        self.shape: tuple[int, int] | None = None  # (batch, tokens) of the last forward
        self.masks: dict[tuple[int, ...], torch.Tensor] = {}
        self.sequences: list[torch.Tensor] | None = None  # set by `row_sequences`: each row's tokens, given
        decoder = getattr(model, "base_model", model)
        decoder.register_forward_pre_hook(self.before_forward, with_kwargs=True)

    def before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        names = _alora_names(self.model)
        if not names:  # the last aLoRA adapter is gone: so is the hook (found in `module`'s own table, which in a
            # deep copy of the model is the copy's)
            for key, hook in list(module._forward_pre_hooks.items()):
                if getattr(hook, "__self__", None) is self:
                    del module._forward_pre_hooks[key]
                    module._forward_pre_hooks_with_kwargs.pop(key, None)
            self.model.__dict__.pop(_KEY, None)
            return
        self.masks = {}
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self.sequences is not None and isinstance(ids, torch.Tensor) and ids.dim() == 2:
            if len(self.sequences) != ids.shape[0]:
                raise AdapterError(f"aLoRA: {len(self.sequences)} row sequences for a batch of {ids.shape[0]} rows")
            self.history, self.shape = None, (ids.shape[0], ids.shape[1])
            return
        if ids is None or not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            embeds = kwargs.get("inputs_embeds")
            self.history = None
            self.shape = tuple(embeds.shape[:2]) if isinstance(embeds, torch.Tensor) else None
            active = self.model.__dict__["_lorakit"].active
            if any(n in active for n in names):
                warnings.warn(
                    "aLoRA: a forward without input_ids cannot find the invocation tokens; the aLoRA adapters are "
                    "off in it (as in PEFT)",
                    stacklevel=2,
                )
            return
        past = _cache_length(kwargs.get("cache", kwargs.get("past_key_values")))
        history = self.history
        if past and history is not None and history.shape == (ids.shape[0], past):
            self.history = torch.cat([history, ids.to(history.device)], dim=1)  # a decode step, say
        else:
            self.history = ids
        self.shape = (ids.shape[0], ids.shape[1])

    def mask(self, tokens: tuple[int, ...]) -> torch.Tensor:
        """(batch, tokens) bool: where the adapter with invocation `tokens` acts in the current forward."""
        found = self.masks.get(tokens)
        if found is not None:
            return found
        if self.shape is None:
            raise AdapterError("aLoRA: no forward of the model's decoder seen yet (call the model, not a layer)")
        if self.sequences is not None:  # given: each row's tokens end with this forward's
            found = torch.cat([invocation_mask(seq[None], self.shape[1], tokens) for seq in self.sequences])
        elif self.history is None:  # inputs_embeds: off everywhere
            found = torch.zeros(self.shape, dtype=torch.bool)
        else:
            found = invocation_mask(self.history, self.shape[1], tokens)
        self.masks[tokens] = found
        return found


@contextmanager
def row_sequences(model: nn.Module, sequences: Callable[[], Sequence[Sequence[int]]]) -> Iterator[None]:
    """Inside: the model's forwards take row i's tokens so far to be `sequences()[i]` (ending with the forward's
    last input token; a left-padded row's padding is not in it), instead of what the hook followed. For a caller
    whose batches join and split rows between forwards (lorakit serve). Without aLoRA adapters nothing happens,
    and `sequences` is not called (a server's decode steps do not build the rows' token lists for nothing)."""
    activation = model.__dict__.get(_KEY)
    if activation is None:
        yield
        return
    activation.sequences = [torch.as_tensor(list(s), dtype=torch.long) for s in sequences()]
    try:
        yield
    finally:
        activation.sequences = None


def invocation_of(model: nn.Module, name: str | None) -> tuple[int, ...] | None:
    """The invocation tokens of adapter `name` on `model`, or None when it is no aLoRA adapter (or None)."""
    reg = model.__dict__.get("_lorakit")
    info = reg.adapters.get(name) if reg is not None and name is not None else None
    tokens = info.config.alora_invocation_tokens if info is not None else None
    return tuple(tokens) if tokens is not None else None


def last_invocation(ids: Sequence[int], tokens: Sequence[int]) -> int | None:
    """Where the last occurrence of `tokens` starts in `ids`, or None."""
    n = len(tokens)
    tokens = list(tokens)
    return next((i for i in range(len(ids) - n, -1, -1) if list(ids[i : i + n]) == tokens), None)


def invocation_mask(history: torch.Tensor, chunk: int, tokens: tuple[int, ...]) -> torch.Tensor:
    """(batch, chunk) bool for the last `chunk` positions of `history` (batch, L): True from the start of the last
    occurrence of `tokens` in each row on (PEFT's alora_offsets), all False in a row without it."""
    batch, length = history.shape
    n = len(tokens)
    if length < n:
        return torch.zeros((batch, chunk), dtype=torch.bool, device=history.device)
    invocation = torch.tensor(tokens, dtype=history.dtype, device=history.device)
    hits = (history.unfold(1, n, 1) == invocation).all(-1)  # (batch, length - n + 1): an occurrence starts here
    starts = torch.arange(hits.shape[1], device=history.device)
    last = torch.where(hits, starts, -1).max(dim=1).values  # (batch,), -1: none
    positions = torch.arange(length - chunk, length, device=history.device)
    return (last >= 0).unsqueeze(1) & (positions.unsqueeze(0) >= last.unsqueeze(1))


def _cache_length(cache: object) -> int:
    if cache is None:
        return 0
    length = getattr(cache, "get_seq_length", None)
    return int(length()) if callable(length) else 0


def _alora_names(model: nn.Module) -> list[str]:
    reg = model.__dict__.get("_lorakit")
    if reg is None:
        return []
    return [n for n, info in reg.adapters.items() if info.config.alora_invocation_tokens is not None]


def _merge_guard(model: nn.Module) -> str | None:
    reg = model.__dict__.get("_lorakit")
    active = [n for n in _alora_names(model) if n in reg.active]
    if not active:
        return None
    return (
        f"cannot merge aLoRA adapter {active[0]!r}: it acts only from its invocation tokens on, and a merged "
        "weight acts on every token (as in PEFT)"
    )


def _folder_check(config: dict, use: str) -> str | None:
    """An aLoRA adapter, from its folder: no merge, no llama.cpp file."""
    if config.get("alora_invocation_tokens") is None:
        return None
    return {
        "bank": None,  # lorakit serve gives the rows' tokens (row_sequences)
        "merge": "cannot merge aLoRA adapters: they act only from their invocation tokens on, and a merged weight "
        "acts on every token (as in PEFT)",
        "gguf": "an aLoRA adapter has no llama.cpp form: it acts only after its invocation tokens, which llama.cpp's "
        "LoRA pairs cannot express (and it cannot be merged)",
    }[use]


register_merge_guard(_merge_guard)
register_folder_check(_folder_check)


def check_invocation(invocation: list[int], rows: list, tokenizer, source: str, say) -> None:
    """For `lorakit train`: how many training rows start the invocation before their first learned token (so that
    the adapter acts where that token is predicted, one position earlier), said with `say`; DataError if none does,
    a warning if some do not."""
    n = len(invocation)

    def invoked(row) -> bool:
        first = next((i for i, lab in enumerate(row.labels) if lab != IGNORE), len(row.labels))
        return any(list(row.input_ids[i : i + n]) == invocation for i in range(first))

    hits = sum(invoked(r) for r in rows)
    text = repr(tokenizer.decode(invocation))
    if hits == 0:
        raise DataError(
            f"{source}: no training example has the aLoRA invocation {text} (tokens {invocation}) before its "
            "first learned token, so the adapter would learn nothing; pick text that every prompt contains as "
            "these tokens (tokenized in context, it may split differently)"
        )
    say(f"aLoRA: invocation {text} = tokens {invocation}, in {hits} of {len(rows)} training examples")
    if hits < len(rows):
        log.warning(
            "%s: %d of %d training examples lack the aLoRA invocation %s before their answer: the adapter learns "
            "nothing from them",
            source,
            len(rows) - hits,
            len(rows),
            text,
        )
