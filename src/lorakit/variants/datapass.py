"""What the data-driven inits (EVA, CorDA) share: passes of training batches through the model with forward
pre-hooks on the layers they initialise, reading each layer's inputs at the positions that count.

- `Stream`: up to a number of batches, going round again when there are fewer.
- `forward`: one pass, asking for one position's logits where the model allows it; a hook raises `Stop` once the
  last hooked layer has read, so nothing after it runs.
- `positions` / `rows`: the (positions, features) rows of a layer input at the non-padding (or labelled)
  positions.
- `same_inputs`: which layers read the same input (q, k, v; gate, up), so that one statistic serves them all.
- `decomposable_targets`: the checks of an init that moves a part of each W0 into the adapter (CorDA, LoRA-GA).
- `DataInitRecord`: what a training run keeps of such an init's result (`lean`, `record`).
- `register_data_init`: the init's name, for configs and files, which a plain `inject` refuses in one line that
  names the function that runs it on data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.data.tokenize import IGNORE
from lorakit.errors import AdapterError
from lorakit.handlers import handler_for
from lorakit.layers import LoraAdapter, LoraLayer, register_init
from lorakit.targeting import select_modules


class DataInitRecord:
    """The base of a data-driven init's result (a dataclass) that a training run keeps: `heavy` names its field
    of tensors, which `lean` drops and `record` leaves out."""

    heavy = ""

    def lean(self):
        """The same result without its tensors, for a caller that keeps it while training."""
        return dataclasses.replace(self, **{self.heavy: {}})

    def record(self) -> dict:
        """What a run's summary.json keeps of it: every other field."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != self.heavy}


def register_data_init(name: str, does: str, entry: str) -> None:
    """Register init `name` (what it `does`, for the message), which needs data: `inject` refuses it, naming
    `lorakit.<entry>` and `lorakit train --lora.init <name>`."""

    def refuse(layer: LoraLayer, adapter: LoraAdapter) -> None:
        raise AdapterError(
            f"init {name!r} {does}: use lorakit.{entry}(model, config, batches) or lorakit train --lora.init {name}"
        )

    register_init(name, refuse)


def decomposable_targets(model: nn.Module, config: LoraConfig, what: str, *, factor: int = 1) -> list[str]:
    """The modules `config` selects, after checking that an init which moves s·B0·A0 out of each W0 can start
    them: linear layers on a full-precision base, with factor·r no larger than the weight's smaller side (LoRA-GA
    picks its r directions from the top 2r). Raises a one-line AdapterError naming the first that fails."""
    names = select_modules(model, config)
    for n in names:
        module = model.get_submodule(n)
        handler = handler_for(module)
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if not linear(model, n):
            raise AdapterError(f"{what} init supports linear layers only, not {type(base).__name__} ({n!r})")
        if handler.quantized:
            raise AdapterError(
                f"{what} init moves a part of W0 into the adapter, which a 4-bit base ({n!r}) cannot take; "
                f"initialise {what} on the full-precision model"
            )
        side = min(handler.dims(base))
        if factor * config.rank_for(n) > side:
            need = "r" if factor == 1 else f"{factor}r"
            raise AdapterError(
                f"{what} init needs {need} <= {side} (the weight's smaller side) for {n!r}, got r={config.rank_for(n)}"
            )
    return names


class Stop(Exception):
    """Raised by the last hook of a pass: nothing after the hooked layers is needed."""


def linear(model: nn.Module, name: str) -> bool:
    """Whether module `name` (plain or already wrapped) is a linear layer a data-driven init can start."""
    handler = handler_for(model.get_submodule(name))
    return handler is not None and handler.linear and not handler.embedding


class Stream:
    """Up to `limit` batches, going round `batches` again (as PEFT cycles its dataloader) when it is shorter;
    `cycled` tells when every batch has been seen once."""

    def __init__(self, batches: Iterable[dict[str, torch.Tensor]], limit: int) -> None:
        self.batches, self.limit, self.cycled = batches, limit, False

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        seen: list[dict[str, torch.Tensor]] = []
        count = 0
        for b in self.batches:
            if count == self.limit:
                return
            seen.append(b)
            count += 1
            yield b
        self.cycled = True
        while seen and count < self.limit:
            for b in seen:
                if count == self.limit:
                    return
                count += 1
                yield b


def positions(batch: dict[str, torch.Tensor], label_mask: bool) -> torch.Tensor:
    """Boolean (batch, seq) mask of the positions whose inputs are read: not padding, and with `label_mask`
    only those that carry a label."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    labels = batch.get("labels")
    if label_mask and labels is not None:
        keep = keep & (labels != IGNORE)
    return keep


def rows(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The (positions, features) rows of a layer input (batch, seq, features) at the kept positions."""
    return x[keep] if x.dim() == 3 and x.shape[:2] == keep.shape else x.reshape(-1, x.shape[-1])


def forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    kwargs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    with contextlib.suppress(Stop):
        model(**kwargs)


def same_inputs(
    model: nn.Module, names: list[str], batch: dict[str, torch.Tensor], what: str
) -> list[tuple[list[str], int]]:
    """One pass that fingerprints each module's input, then groups the modules whose inputs are equal (the sums
    of x, x² and x times a fixed ramp, in float64: different inputs that agree on all three do not occur), in
    model order: (modules, the input's width) per group. Every non-padding position counts. `what` names the init
    in the error for a module the pass never called."""
    keep = positions(batch, label_mask=False)
    prints: dict[str, tuple] = {}
    handles = []
    for n in names:

        def hook(module, args, n=n):
            x = rows(args[0], keep).double()
            ramp = torch.arange(1, x.shape[-1] + 1, dtype=torch.float64, device=x.device)
            prints[n] = (tuple(x.shape), float(x.sum()), float(x.square().sum()), float((x * ramp).sum()))
            if len(prints) == len(names):
                raise Stop  # nothing after the last target is needed

        handles.append(model.get_submodule(n).register_forward_pre_hook(hook))
    try:
        forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in prints]
    if missing:
        raise AdapterError(f"{what}: {missing[0]!r} was not called in a forward pass, so it has no inputs to analyse")
    same: dict[tuple, list[str]] = {}
    for n in names:
        same.setdefault(prints[n], []).append(n)
    return [(modules, key[0][-1]) for key, modules in same.items()]
