"""Mixed-adapter batches: every batch row names its own adapter (or none), in one forward pass.

    with lorakit.row_adapters(model, ["fr", "de", None, "fr"]):
        logits = model(input_ids).logits          # row 0 and 3 with "fr", row 1 with "de", row 2 plain base

The base matmul runs once for the whole batch. Each LoRA layer then adds its low-rank products with two batched
matmuls, whatever the number of distinct adapters: the plan stacks, per row, the row's A and s·B (zero-padded to
the largest rank, so adapters of different ranks mix) and computes ``bmm(bmm(x, Aᵀ), (s·B)ᵀ)`` for all rows at
once (Punica's gather-then-bmm). The gathered stacks are cached per layer for the last batch composition
(`clear_row_cache` frees them), so the decode steps of a batch reuse them and pay only the two small bmms.
Rows without an adapter are skipped.

Layers whose adapters the stacked path cannot express (DoRA, embeddings, convolutions, dropout while training)
fall back to one masked pass per distinct adapter, which is exact but loops.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.errors import AdapterError
from lorakit.inject import adapter_names, lora_layers
from lorakit.layers import Handler, LoraLayer, Variant


@dataclass(eq=False)
class RowPlan:
    """Which adapter each batch row uses; shared by every LoRA layer of the model during one batch."""

    names: tuple[str | None, ...]
    rows: torch.Tensor = field(init=False)  # indices of rows that have an adapter
    all_rows: bool = field(init=False)

    def __post_init__(self) -> None:
        self.rows = torch.tensor([i for i, n in enumerate(self.names) if n is not None], dtype=torch.long)
        self.all_rows = len(self.rows) == len(self.names)

    @property
    def batch(self) -> int:
        return len(self.names)


@contextmanager
def row_adapters(model: nn.Module, names: Sequence[str | None]) -> Iterator[RowPlan]:
    """Inside the block, row i of every batch uses adapter `names[i]` (None: the base model alone)."""
    plan = make_plan(model, names)
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.row_plan = plan
    try:
        yield plan
    finally:
        for layer in layers:
            layer.row_plan = None


def clear_row_cache(model: nn.Module) -> None:
    """Free the stacked per-row adapter weights that LoRA layers keep for the last batch composition."""
    for _, layer in lora_layers(model):
        layer.row_cache = None


def make_plan(model: nn.Module, names: Sequence[str | None]) -> RowPlan:
    known = adapter_names(model)
    if not names:
        raise AdapterError("row adapters: the batch has no rows")
    for n in names:
        if n is not None and n not in known:
            raise AdapterError(f"row adapters: no adapter {n!r} on {type(model).__name__}; adapters: {known}")
    if any(layer.merged for _, layer in lora_layers(model)):
        raise AdapterError("row adapters: adapters are merged into the base weights; unmerge(model) first")
    return RowPlan(tuple(names))


def _stackable(layer: LoraLayer, names: set[str]) -> bool:
    if type(layer.handler).lora is not Handler.lora:  # embedding / conv forms
        return False
    grad = torch.is_grad_enabled()
    for n in names:
        adapter = layer.adapters[n]
        if type(adapter.variant) is not Variant:
            return False
        if grad and adapter.lora_A.requires_grad:  # the cached stacks carry no gradient: train per group
            return False
        if layer.training and isinstance(adapter.dropout, nn.Dropout):
            return False
    return True


def _row_stacks(layer: LoraLayer, plan: RowPlan, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Aᵀ per row (M, k, r), (s·B)ᵀ per row (M, r, d)) for the rows that have an adapter here; zero rows where
    this layer lacks the row's adapter; ranks zero-padded to the largest."""
    present = [n for n in dict.fromkeys(plan.names) if n is not None and n in layer.adapters]
    r_max = max((layer.adapters[n].lora_A.shape[0] for n in present), default=1)
    k = layer.adapters[present[0]].lora_A.shape[1] if present else like.shape[-1]
    d = layer.adapters[present[0]].lora_B.shape[0] if present else 1
    slot = {n: i for i, n in enumerate(present)}
    a_stack = like.new_zeros(
        (len(present) + 1, k, r_max)
    )  # last slot: zeros, for rows without an adapter here
    b_stack = like.new_zeros((len(present) + 1, r_max, d))
    with torch.no_grad():
        for n, i in slot.items():
            ad = layer.adapters[n]
            r = ad.lora_A.shape[0]
            a_stack[i, :, :r] = ad.lora_A.T.to(like.dtype)
            b_stack[i, :r, :] = (ad.lora_B.T * ad.scaling).to(like.dtype)
    idx = torch.tensor([slot.get(plan.names[int(j)], len(present)) for j in plan.rows], dtype=torch.long)
    return a_stack.index_select(0, idx), b_stack.index_select(0, idx)


def mixed_forward(layer: LoraLayer, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out` (the base output for x) plus each row's adapter contribution."""
    plan: RowPlan = layer.row_plan
    if x.shape[0] != plan.batch:
        raise AdapterError(
            f"row adapters name {plan.batch} rows, but the batch has {x.shape[0]} (one adapter name per row)"
        )
    used = {n for n in plan.names if n is not None and n in layer.adapters}
    if not used:
        return out
    if not _stackable(layer, used):
        return _looped(layer, x, out, plan, used)
    # The stacks are cached per layer for the last batch composition, so the decode steps of a batch (and later
    # batches with the same rows) reuse them. The key holds the adapters' tensor versions: any in-place change of
    # their weights (training, copy_) rebuilds the stacks.
    key = (plan.names, x.dtype, tuple(_version(layer.adapters[n]) for n in sorted(used)))
    if layer.row_cache is None or layer.row_cache[0] != key:
        layer.row_cache = (key, *_row_stacks(layer, plan, x))
    _, a_rows, b_rows = layer.row_cache
    shape = x.shape
    xs = x if plan.all_rows else x.index_select(0, plan.rows)
    xs = xs.reshape(xs.shape[0], -1, shape[-1])  # (M, tokens, k)
    if xs.dtype != a_rows.dtype:
        xs = xs.to(a_rows.dtype)
    y = torch.bmm(torch.bmm(xs, a_rows), b_rows).to(out.dtype)  # (M, tokens, d)
    if plan.all_rows:
        return out + y.view(out.shape)
    return out.index_add(0, plan.rows, y.view(len(plan.rows), *out.shape[1:]))


def _version(adapter) -> tuple[int, int]:
    return adapter.lora_A._version, adapter.lora_B._version


def _looped(
    layer: LoraLayer, x: torch.Tensor, out: torch.Tensor, plan: RowPlan, used: set[str]
) -> torch.Tensor:
    """One pass per distinct adapter over its rows: for variants and layer types without a stacked form."""
    for name in sorted(used):
        rows = torch.tensor([i for i, n in enumerate(plan.names) if n == name], dtype=torch.long)
        adapter = layer.adapters[name]
        xs, base = x.index_select(0, rows), out.index_select(0, rows)
        out = out.index_add(0, rows, adapter.variant.forward(layer, adapter, xs, base))
    return out
