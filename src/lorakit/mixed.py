"""Mixed-adapter batches: every batch row names its own adapter (or none), in one forward pass.

    with lorakit.row_adapters(model, ["fr", "de", None, "fr"]):
        logits = model(input_ids).logits          # row 0 and 3 with "fr", row 1 with "de", row 2 plain base

The base matmul runs once for the whole batch. Each LoRA layer then adds its low-rank products with two batched
matmuls, whatever the number of distinct adapters (segmented gather-and-bmm, as Punica and S-LoRA do):

* the plan sorts the rows that have an adapter into one segment per distinct adapter (in the order the adapters
  were added to the model), each padded to the longest segment's row count (`RowPlan.width`); the plan is built
  once per batch and shared by every layer;
* each layer stacks its copy of the batch's G distinct adapters once, as Aᵀ (G, k, r) and (s·B)ᵀ (G, r, d),
  zero-padded to the largest rank (so adapters of different ranks mix, and a layer without one of the adapters
  contributes zeros for its rows);
* the forward gathers x into the segments (G, width·tokens, k), computes ``bmm(bmm(x, Aᵀ), (s·B)ᵀ)`` and scatters
  the rows back onto the base output.

Each adapter's weights are read once per forward however many rows use it: with few distinct adapters a decode
step reads G adapters, not one copy per row. The stacks are cached per layer and reused by later batches over the
same set of adapters (the engine's decode steps); the cache key holds the adapters' tensor versions and scalings,
so an in-place change of their weights (training, copy_) rebuilds it. `clear_row_cache` frees the stacks.
Rows without an adapter are skipped. Padding costs compute only: with one long segment and many short ones, the
short ones are padded to its length.

An adapter with a bias on B (PEFT's lora_bias) stacks too: its s·b sits in a (G, 1, d) stack added with the
products. Layers whose adapters the stacked path cannot express (DoRA, DyLoRA, AdaLoRA, embeddings, convolutions,
dropout while training, adapters that require grad while grad is on) fall back to one masked pass per distinct
adapter, which is exact but loops.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.errors import AdapterError
from lorakit.handlers import Handler
from lorakit.layers import LoraLayer
from lorakit.params import param_wrappers
from lorakit.registry import adapter_names, lora_layers, uses_wrappers
from lorakit.saved import set_rows


@dataclass(eq=False)
class RowPlan:
    """Which adapter each batch row uses, and the segment layout every LoRA layer of the model shares."""

    names: tuple[str | None, ...]
    order: Sequence[
        str
    ] = ()  # the stacks' adapter order (the model's, stable across batches); default: sorted
    groups: tuple[str, ...] = field(init=False)  # the batch's distinct adapters, in `order`
    rows: torch.Tensor = field(init=False)  # indices of rows that have an adapter, ascending
    all_rows: bool = field(init=False)
    width: int = field(init=False)  # rows per segment (the largest group's row count)
    gather: torch.Tensor = field(init=False)  # (G·width,) segment slot -> batch row (pads repeat a real row)
    scatter: torch.Tensor = field(init=False)  # (len(rows),) row -> its segment slot
    identity: bool = field(init=False)  # rows already in segment order, no padding: no gather or scatter

    def __post_init__(self) -> None:
        present = {n for n in self.names if n is not None}
        self.groups = tuple(n for n in (self.order or sorted(present)) if n in present)
        if len(self.groups) != len(present):
            raise AdapterError(f"row adapters: the order {list(self.order)} lacks some of {sorted(present)}")
        members = {g: [i for i, n in enumerate(self.names) if n == g] for g in self.groups}
        rows = [i for i, n in enumerate(self.names) if n is not None]
        self.rows = torch.tensor(rows, dtype=torch.long)
        self.all_rows = len(rows) == len(self.names)
        self.width = max((len(m) for m in members.values()), default=0)
        gather, slot = [], {}
        for g in self.groups:
            for j in range(self.width):
                if j < len(members[g]):
                    slot[members[g][j]] = len(gather)
                    gather.append(members[g][j])
                else:
                    gather.append(rows[0])
        self.gather = torch.tensor(gather, dtype=torch.long)
        self.scatter = torch.tensor([slot[i] for i in rows], dtype=torch.long)
        self.identity = gather == list(range(len(self.names)))

    @property
    def batch(self) -> int:
        return len(self.names)

    def forward(self, layer: LoraLayer, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """What a LoRA layer running under this plan returns: `mixed_forward` (the layer calls it)."""
        return mixed_forward(layer, x, out)


@contextmanager
def row_adapters(model: nn.Module, names: Sequence[str | None]) -> Iterator[RowPlan]:
    """Inside the block, row i of every batch uses adapter `names[i]` (None: the base model alone)."""
    plan = make_plan(model, names)
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.row_plan = plan
    wrapped = uses_wrappers(model)
    if wrapped:
        set_rows(model, plan.names)  # modules saved whole run each row through its adapter's copy
    try:
        yield plan
    finally:
        if wrapped:
            set_rows(model, None)
        for layer in layers:
            layer.row_plan = None


def clear_row_cache(model: nn.Module) -> None:
    """Free the stacked adapter weights that LoRA layers keep for the last set of batch adapters."""
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
    for where, wrapper in param_wrappers(model) if uses_wrappers(model) else ():
        used = [n for n in names if n is not None and n in wrapper.lora]
        if used:
            raise AdapterError(
                f"row adapters: adapter {used[0]!r} adapts parameters of {where!r} (target_parameters), which a "
                "mixed-adapter batch cannot split by row; run its rows with set_active"
            )
    return RowPlan(tuple(names), known)


@dataclass(eq=False)
class _LayerState:
    """What one layer decided for one plan (so later calls with the same plan skip every check), and its stacks."""

    plan: RowPlan
    grad: bool
    training: bool
    dtype: torch.dtype
    used: tuple[str, ...]  # the plan's adapters this layer has
    stacked: bool
    tensors: tuple = ()  # per used adapter: its parameters (A, B, ...), the tensors the stacks were built from
    stamp: tuple = ()  # their versions and scalings: an in-place change or a new scaling rebuilds the stacks
    a: torch.Tensor | None = None  # (G, k, r_max): Aᵀ per group
    b: torch.Tensor | None = None  # (G, r_max, d): (s·B)ᵀ per group
    c: torch.Tensor | None = None  # (G, 1, d): s·b per group (lora_bias), or None when no group has one


def _stackable(layer: LoraLayer, names: Sequence[str]) -> bool:
    if type(layer.handler).lora is not Handler.lora:  # embedding / conv forms
        return False
    grad = torch.is_grad_enabled()
    for n in names:
        adapter = layer.adapters[n]
        if not adapter.variant.stacks:
            return False
        if grad and adapter.lora_A.requires_grad:  # the cached stacks carry no gradient: train per group
            return False
        if layer.training and isinstance(adapter.dropout, nn.Dropout):
            return False
    return True


def _state(layer: LoraLayer, plan: RowPlan, dtype: torch.dtype) -> _LayerState:
    used = tuple(n for n in plan.groups if n in layer.adapters)
    state = _LayerState(plan, torch.is_grad_enabled(), layer.training, dtype, used, False)
    if not used or not _stackable(layer, used):
        return state
    state.stacked = True
    adapters = [layer.adapters[n] for n in used]
    state.tensors = tuple(tuple(ad.parameters()) for ad in adapters)  # A, B and a variant's own (lora_bias)
    state.stamp = tuple((*(p._version for p in ad.parameters()), ad.scaling) for ad in adapters)
    old = layer.row_cache
    if old is not None and old.a is not None and _same_stacks(old, state):
        state.a, state.b, state.c = old.a, old.b, old.c
    else:
        state.a, state.b, state.c = _stacks(layer, plan.groups, used, dtype)
    return state



def _same_stacks(old: _LayerState, new: _LayerState) -> bool:
    """Would `new` build the same stacks as `old` has: same adapters, dtype, tensors, versions and scalings?"""
    if old.plan.groups != new.plan.groups or old.dtype != new.dtype or old.stamp != new.stamp:
        return False
    return all(
        all(t0 is t1 for t0, t1 in zip(old_ts, new_ts, strict=True))
        for old_ts, new_ts in zip(old.tensors, new.tensors, strict=True)
    )


def _stacks(
    layer: LoraLayer, groups: tuple[str, ...], used: tuple[str, ...], dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """(Aᵀ (G, k, r_max), (s·B)ᵀ (G, r_max, d), s·b (G, 1, d) or None) for the groups; zeros for groups this layer
    lacks (not in `used`), and for groups without a bias when another has one."""
    first = layer.adapters[used[0]]
    k, d = first.lora_A.shape[1], first.lora_B.shape[0]
    r_max = max(layer.adapters[n].lora_A.shape[0] for n in used)
    a_stack = first.lora_A.new_zeros((len(groups), k, r_max), dtype=dtype)
    b_stack = first.lora_A.new_zeros((len(groups), r_max, d), dtype=dtype)
    with torch.no_grad():
        adds = {n: layer.adapters[n].variant.bias_delta(layer, layer.adapters[n]) for n in used}
        biased = any(add is not None for add in adds.values())
        c_stack = first.lora_A.new_zeros((len(groups), 1, d), dtype=dtype) if biased else None
        for i, n in enumerate(groups):
            if n in layer.adapters:
                ad = layer.adapters[n]
                r = ad.lora_A.shape[0]
                a_stack[i, :, :r] = ad.lora_A.T.to(dtype)
                b_stack[i, :r, :] = (ad.lora_B.T * ad.scaling).to(dtype)
                if adds[n] is not None:
                    c_stack[i, 0] = adds[n].to(dtype)
    return a_stack, b_stack, c_stack


def mixed_forward(layer: LoraLayer, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out` (the base output for x) plus each row's adapter contribution."""
    plan: RowPlan = layer.row_plan
    if x.shape[0] != plan.batch:
        raise AdapterError(
            f"row adapters name {plan.batch} rows, but the batch has {x.shape[0]} (one adapter name per row)"
        )
    state = layer.row_cache
    grad = torch.is_grad_enabled()
    if (
        state is None
        or state.plan is not plan
        or state.grad != grad
        or state.training != layer.training
        or state.dtype != x.dtype
    ):
        state = layer.row_cache = _state(layer, plan, x.dtype)
    if not state.used:
        return out
    if not state.stacked:
        return _looped(layer, x, out, plan, state.used)
    a, b, c = state.a, state.b, state.c
    groups, k, d = a.shape[0], x.shape[-1], b.shape[-1]
    xs = x.reshape(plan.batch, -1, k)  # (M, tokens, k)
    tokens = xs.shape[1]
    if not plan.identity:
        xs = xs.index_select(0, plan.gather)  # (G·width, tokens, k)
    if xs.dtype != a.dtype:
        xs = xs.to(a.dtype)
    h = torch.bmm(xs.reshape(groups, plan.width * tokens, k), a)  # (G, width·tokens, r)
    if plan.identity and not grad and out.is_contiguous() and out.dtype == b.dtype:  # rows in segment order
        y = out.view(groups, plan.width * tokens, d).baddbmm_(h, b)
        return (y if c is None else y.add_(c)).view(out.shape)
    y = torch.bmm(h, b) if c is None else torch.baddbmm(c, h, b)  # (G, width·tokens, d)
    y = y.view(groups * plan.width, tokens, d)
    if not plan.identity:
        y = y.index_select(0, plan.scatter)  # (rows with an adapter, tokens, d)
    y = y.to(out.dtype)
    if plan.all_rows:
        y = y.view(out.shape)
        return out.add_(y) if not grad else out + y
    if not grad and out.is_contiguous():
        out.view(plan.batch, tokens, d).index_add_(0, plan.rows, y)
        return out
    return out.reshape(plan.batch, tokens, d).index_add(0, plan.rows, y).view(out.shape)


def _looped(
    layer: LoraLayer, x: torch.Tensor, out: torch.Tensor, plan: RowPlan, used: Sequence[str]
) -> torch.Tensor:
    """One pass per distinct adapter over its rows: for variants and layer types without a stacked form."""
    for name in used:
        rows = torch.tensor([i for i, n in enumerate(plan.names) if n == name], dtype=torch.long)
        adapter = layer.adapters[name]
        xs, base = x.index_select(0, rows), out.index_select(0, rows)
        out = out.index_add(0, rows, adapter.variant.forward(layer, adapter, xs, base))
    return out
