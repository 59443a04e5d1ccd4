"""LoRA wrapper modules.

A `LoraLayer` wraps (never subclasses) a base module and holds named adapters:

    forward(x) = base(x) + Σ_{active a} w_a · s_a · B_a(A_a(dropout(x)))

What differs between base layer types (Linear, Embedding, ConvNd, GPT-2 Conv1D, 4-bit linears) lives in a small
`Handler` (lorakit.handlers). What differs between LoRA flavours (plain, DoRA, DyLoRA, AdaLoRA) lives in a
`Variant` strategy, so the plain path has no variant branches; flavours register themselves with
`register_variant`, and initialisations other than the handler's (PiSSA) with `register_init`. All weight math goes
through `delta_weight`, in the base weight's layout. Merging writes into a copy of the weight, checks that it is
finite, and only then assigns it (after PEFT's `safe_merge`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from lorakit import fused
from lorakit.config import LoraConfig
from lorakit.errors import AdapterError, QuantizationError
from lorakit.handlers import Handler

# --------------------------------------------------------------------------------------------------------------
# Variants: plain LoRA here; DoRA and the others in lorakit.variants, registered by name.
# --------------------------------------------------------------------------------------------------------------


class Variant:
    """Strategy for one LoRA flavour: its tensors, extra state, forward delta, merge and unmerge. Plain LoRA is
    this class. A flavour subclasses it and calls `register_variant`."""

    name: ClassVar[str] = "lora"
    label: ClassVar[str] = "LoRA"
    merges_alone: ClassVar[bool] = False
    """Whether merging this adapter together with others into one layer is refused (DoRA's normalisation)."""
    plain: ClassVar[bool] = True
    """Whether the adapter at inference is exactly s·B·A of `factors` added to the base output, so that a runtime
    that knows only plain LoRA pairs (llama.cpp's GGUF adapters) computes it. False: DoRA's normalisation."""
    not_plain_because: ClassVar[str] = ""
    """When not `plain`: why, in a few words (e.g. "DoRA's magnitude rescales W0 + ΔW")."""
    stacks: ClassVar[bool] = True
    """Whether the adapter's contribution is exactly `handler.lora(x, A, B, scaling)` plus `bias_delta` (broadcast
    along the output features), so that mixed-adapter batches may stack it with others (lorakit.mixed). A subclass
    does not inherit it: it says so in its own class body, or it is False."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "stacks" not in cls.__dict__:
            cls.stacks = False

    @classmethod
    def selects(cls, config: LoraConfig) -> bool:
        """Whether `inject` picks this variant for `config` by itself (DoRA: `use_dora`)."""
        return False

    @classmethod
    def refusal(cls, handler: Handler) -> str | None:
        """A reason this variant cannot attach to base layers of `handler`'s kind, or None (it can)."""
        return None

    @classmethod
    def model_refusal(cls, model: nn.Module) -> str | None:
        """A reason this variant cannot work on `model` as a whole, or None (it can); checked before inject
        touches the model."""
        return None

    @classmethod
    def attach(cls, model: nn.Module, name: str) -> None:
        """After inject added adapter `name` of this variant to `model`: set up what it needs at the model's level
        (aLoRA: the hook that finds each row's invocation)."""

    @classmethod
    def create(cls, config: LoraConfig, module: str) -> Variant:
        """The variant object for one adapted module (one object may serve all of an adapter's layers)."""
        return cls()

    def tensor_names(self, handler: Handler) -> dict[str, str]:
        """The adapter's tensors: attribute on the adapter -> PEFT's key suffix in the file."""
        if handler.embedding:
            return {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}
        return {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}

    def tensor_shapes(self, handler: Handler, base: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
        """The shape of each tensor in `tensor_names`, for a base layer and rank (checked when loading)."""
        a_shape, b_shape = handler.shapes(base, r)
        return {"lora_A": a_shape, "lora_B": b_shape}

    def init(self, layer: LoraLayer, adapter: LoraAdapter) -> None:
        """Create variant state on `adapter` after A and B are initialised."""

    def factors(self, adapter: LoraAdapter) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, s) with ΔW = s·B·A at inference; DyLoRA returns the first b components and α/b."""
        return adapter.lora_A, adapter.lora_B, adapter.scaling

    def fused_factors(self, adapter: LoraAdapter) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A, B) for the fused kernels (`lorakit.fused`), where this variant's forward is exactly plain LoRA's
        with them; None: the variant's own forward runs. Plain LoRA: its own A and B; a subclass: None unless it
        says otherwise (BD-LoRA: its dense factors)."""
        return (adapter.lora_A, adapter.lora_B) if type(self) is Variant else None

    def plain_pair(self, adapter: LoraAdapter) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A, B) of the plain LoRA pair that, scaled by the adapter's own s, is its change to W0 (KaSA's has rank
        2r), for a file that runtimes knowing LoRA pairs only can load; None: its file is plain LoRA already."""
        return None

    def metadata(self) -> dict[str, str]:
        """Safetensors metadata the adapter file carries for this variant; `restore` reads it back."""
        return {}

    @classmethod
    def restore(cls, model: nn.Module, name: str, value: str) -> None:
        """After adapter `name` was loaded with this variant and its tensors: set the state beyond its tensors
        from the metadata `value` that `metadata` wrote (nothing by default)."""

    def forward(
        self, layer: LoraLayer, adapter: LoraAdapter, x: torch.Tensor, base_out: torch.Tensor
    ) -> torch.Tensor:
        """The adapter's contribution to the output (to be added to base_out)."""
        A, B = adapter.lora_A, adapter.lora_B
        if x.is_floating_point() and x.dtype != A.dtype:
            x = x.to(A.dtype)
        y = layer.handler.lora(layer.base_layer, adapter.dropout(x), A, B, adapter.scaling)
        return y if y.dtype == base_out.dtype else y.to(base_out.dtype)

    def bias_delta(self, layer: LoraLayer, adapter: LoraAdapter) -> torch.Tensor | None:
        """What merging adds to the base layer's bias, in its shape (None: nothing; PEFT's lora_bias: s·b)."""
        return None

    @torch.no_grad()
    def merge(self, layer: LoraLayer, adapter: LoraAdapter, weight: float, w: torch.Tensor) -> object:
        """Fold the adapter (times `weight`) into `w`, a copy of the base weight, in place; return what unmerge
        needs."""
        w.add_(delta_weight(layer, adapter).to(w.dtype), alpha=weight)
        return None

    @torch.no_grad()
    def unmerge(self, layer: LoraLayer, adapter: LoraAdapter, weight: float, state: object) -> None:
        w = layer.handler.weight(layer.base_layer)
        w.sub_(delta_weight(layer, adapter).to(w.dtype), alpha=weight)


VARIANTS: dict[str, type[Variant]] = {"lora": Variant}
"""Registered variants by name (their metadata key is "lorakit.<name>")."""
INITS: dict[str, Callable[[LoraLayer, LoraAdapter], None]] = {}
"""Registered initialisations beyond the handler's own (default, gaussian, random): name -> init(layer, adapter)."""
INIT_FACTORS: dict[str, Callable[[torch.Tensor, int, float], tuple[torch.Tensor, torch.Tensor]]] = {}
"""Of the inits that move a part of W0 into B·A (PiSSA, OLoRA): name -> factors(W0 as 2-D, r, s) -> (A0, B0), the
start they compute from W0, deterministically (so that a loaded file can be made relative to the original W0:
`plain_lora.as_plain_lora`)."""
INIT_FROZEN: dict[str, tuple[str, ...]] = {}
"""Of the inits that fix a factor for good (MiCA's B): name -> the adapter attributes training leaves frozen."""


def register_variant(cls: type[Variant]) -> type[Variant]:
    """Make variant class `cls` known by its `name`: `inject(..., variant=name)` picks it, `cls.selects(config)`
    lets a config pick it, and a file whose metadata has "lorakit.<name>" gets it back on load. A decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Variant)):
        raise TypeError(f"register_variant takes a Variant subclass, not {cls!r}")
    VARIANTS[cls.name] = cls
    return cls


def register_init(
    name: str,
    init: Callable[[LoraLayer, LoraAdapter], None],
    *,
    factors: Callable[[torch.Tensor, int, float], tuple[torch.Tensor, torch.Tensor]] | None = None,
    frozen: tuple[str, ...] = (),
) -> None:
    """Make `init(layer, adapter)` the initialisation for `LoraConfig(init=name)` (it sets A and B). `factors`:
    for an init that moves s·B0·A0 out of W0, the (A0, B0) it starts from, given W0 (2-D), r and s. `frozen`: the
    adapter's attributes ("lora_A", "lora_B") that stay frozen when the adapter is trainable."""
    INITS[name] = init
    if factors is not None:
        INIT_FACTORS[name] = factors
    if frozen:
        INIT_FROZEN[name] = tuple(frozen)


def variant_class(config: LoraConfig, name: str | None = None) -> type[Variant]:
    """The variant `inject` uses: the one named, else the first registered that selects `config`, else plain."""
    if name is not None:
        cls = VARIANTS.get(name)
        if cls is None:
            raise AdapterError(f"unknown LoRA variant {name!r}; registered: {', '.join(VARIANTS)}")
        return cls
    return next((cls for cls in VARIANTS.values() if cls.selects(config)), Variant)


# --------------------------------------------------------------------------------------------------------------
# Adapter and layer modules
# --------------------------------------------------------------------------------------------------------------


class LoraAdapter(nn.Module):
    """One named adapter in one layer: A, B, scaling, dropout and the variant's state (e.g. DoRA's magnitude)."""

    def __init__(
        self,
        a_shape: tuple[int, ...],
        b_shape: tuple[int, ...],
        *,
        r: int,
        alpha: float,
        scaling: float,
        dropout: float,
        variant: Variant,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(a_shape, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(b_shape, dtype=dtype, device=device))
        self.r, self.alpha, self.scaling = r, alpha, scaling
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.variant = variant
        # a part of W0 the init moved into B·A (PiSSA), given back to W0 when the adapter is removed
        self.register_buffer("base_residual", None, persistent=False)
        self.on_remove = None  # set by an init that changed the base some other way (LoftQ): undoes it
        # (A0, B0) of an init that moved s·B0·A0 out of W0 and cannot compute it again at load (CorDA: it came from
        # data): saving writes the adapter as plain LoRA on the original W0, [A; A0] and [B, −B0]
        self.start: tuple[torch.Tensor, torch.Tensor] | None = None
        self.init_config: LoraConfig | None = None  # the adapter's config, for inits that need more than r and s

    def adapter_params(self, handler: Handler) -> dict[str, torch.Tensor]:
        """The adapter's tensors as its variant declares them: PEFT key suffix -> tensor (torchtune's protocol)."""
        return {key: getattr(self, attr) for attr, key in self.variant.tensor_names(handler).items()}

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, variant={self.variant.name}"


def delta_weight(layer: LoraLayer, adapter: LoraAdapter) -> torch.Tensor:
    """ΔW = s·B·A for `adapter`, in the base weight's layout and the adapter's dtype."""
    A, B, s = adapter.variant.factors(adapter)
    return layer.handler.from_2d((B.flatten(1) @ A.flatten(1)) * s, layer.base_layer)


class Merged(NamedTuple):
    """What `LoraLayer.merged_weight` computes: the new weight, the new bias (None: unchanged) and the records
    (name, weight, unmerge state) of the adapters folded in."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    records: list[tuple[str, float, object]]


class LoraLayer(nn.Module):
    """A base module plus named adapters. Base weights are never copied; switching adapters changes dicts only."""

    per_adapter: ClassVar[tuple[str, ...]] = ("adapters",)  # what lorakit.walk.base_modules does not walk

    def __init__(self, base_layer: nn.Module, handler: Handler) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.handler = handler
        self.adapters = nn.ModuleDict()
        self.active: dict[str, float] = {}  # adapter name -> weight
        self.merged: list[tuple[str, float, object]] = []  # (name, weight, unmerge state), in merge order
        self.disabled = False
        self._run: tuple[tuple[str, float], ...] = ()
        self.group = (
            None  # a sibling group (lorakit.siblings): layers sharing this layer's input (q/k/v, gate/up)
        )
        self.row_plan = (
            None  # while a mixed-adapter batch runs: an object whose .forward(layer, x, out) takes over
        )
        self.row_cache: tuple | None = None

    def add_adapter(
        self,
        name: str,
        *,
        r: int,
        alpha: float,
        scaling: float,
        dropout: float,
        init: str,
        variant: Variant | None = None,
        config: LoraConfig | None = None,
        zeros: bool = False,
    ) -> None:
        """Add adapter `name`: A and B as `init` draws them (`zeros`: at zero, for a caller that writes them next,
        unless `init` is a registered one, which may change the base), then the variant's own set-up."""
        if self.handler.embedding:
            dropout = 0.0
        a_shape, b_shape = self.handler.shapes(self.base_layer, r)
        dtype, device = self.handler.dtype_device(self.base_layer)
        adapter = LoraAdapter(
            a_shape,
            b_shape,
            r=r,
            alpha=alpha,
            scaling=scaling,
            dropout=dropout,
            variant=variant if variant is not None else Variant(),
            dtype=dtype,
            device=device,
        )
        adapter.init_config = config
        if init in INITS:
            INITS[init](self, adapter)
        elif zeros:
            adapter.lora_A.data.zero_()
            adapter.lora_B.data.zero_()
        else:
            self.handler.init(adapter.lora_A.data, adapter.lora_B.data, init, r)
        adapter.variant.init(self, adapter)
        self.adapters[name] = adapter
        self.row_cache = None

    def remove_adapter(self, name: str) -> None:
        adapter = self.adapters[name]
        if adapter.base_residual is not None:  # the init moved a part of W0 into B·A: put it back
            with torch.no_grad():
                w = self.handler.weight(self.base_layer)
                w.add_(adapter.base_residual.to(w.dtype))
        if adapter.on_remove is not None:
            adapter.on_remove()
        del self.adapters[name]
        self.active.pop(name, None)
        self.row_cache = None
        self.refresh()

    def refresh(self) -> None:
        """Recompute which adapters the forward runs (active, not merged, not disabled)."""
        merged = {m[0] for m in self.merged}
        self._run = (
            ()
            if self.disabled
            else tuple((n, w) for n, w in self.active.items() if n not in merged and n in self.adapters)
        )

    def _to_merge(self) -> list[tuple[str, float]]:
        merged = {m[0] for m in self.merged}
        return [(n, w) for n, w in self.active.items() if n in self.adapters and n not in merged]

    @torch.no_grad()
    def merged_weight(self) -> Merged | None:
        """The base weight (and bias, where an adapter adds to it) with the active unmerged adapters folded in, as
        new tensors, and the merge records; None if there is nothing to merge. The layer is unchanged. Raises if
        the result would not be finite, or if an adapter adds to a bias the base layer does not have."""
        todo = self._to_merge()
        if not todo:
            return None
        refusal = self.handler.merge_refusal(self.base_layer)
        if refusal:
            raise QuantizationError(refusal)
        w = self.handler.weight(self.base_layer).detach().clone()
        bias = None
        records = []
        for name, weight in todo:
            adapter = self.adapters[name]
            records.append((name, weight, adapter.variant.merge(self, adapter, weight, w)))
            add = adapter.variant.bias_delta(self, adapter)
            if add is not None and (self._has_bias() or bool(add.any())):  # a zero b needs no bias to go into
                if bias is None:
                    bias = self._base_bias(name).detach().clone()
                bias.add_(add.to(bias.dtype), alpha=weight)
        if not bool(torch.isfinite(w).all()) or (bias is not None and not bool(torch.isfinite(bias).all())):
            names = ", ".join(repr(n) for n, _ in todo)
            raise AdapterError(
                f"merging adapter {names} into {type(self.base_layer).__name__} gives non-finite weights (nan or "
                "inf); nothing was merged"
            )
        return Merged(w, bias, records)

    def _has_bias(self) -> bool:
        return isinstance(getattr(self.base_layer, "bias", None), torch.Tensor)

    def _base_bias(self, adapter: str) -> torch.Tensor:
        bias = getattr(self.base_layer, "bias", None)
        if not isinstance(bias, torch.Tensor):
            raise AdapterError(
                f"adapter {adapter!r} has a bias on B (lora_bias) but the {type(self.base_layer).__name__} it "
                "adapts has no bias to merge it into (as in PEFT); nothing was merged"
            )
        return bias

    @torch.no_grad()
    def merge_active(self) -> None:
        """Fold the active adapters into the base weight: computed in a copy, checked finite, then assigned."""
        result = self.merged_weight()
        if result is None:
            return
        self.handler.weight(self.base_layer).copy_(result.weight)
        if result.bias is not None:
            self.base_layer.bias.copy_(result.bias)
        self.merged += result.records
        self.refresh()

    @torch.no_grad()
    def unmerge_all(self) -> None:
        while self.merged:
            name, weight, state = self.merged.pop()
            adapter = self.adapters[name]
            adapter.variant.unmerge(self, adapter, weight, state)
            add = adapter.variant.bias_delta(self, adapter)
            if add is not None and self._has_bias():  # without a bias, merging added nothing (b was zero)
                bias = self.base_layer.bias
                bias.sub_(add.to(bias.dtype), alpha=weight)
        self.refresh()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_plan is not None and not self.disabled:
            return self.row_plan.forward(self, x, self.base_layer(x, *args, **kwargs))
        if len(self._run) == 1 and not args and not kwargs and fused.fused_enabled():
            y = self._fused(x)
            if y is not None:
                return y
        out = self.base_layer(x, *args, **kwargs)
        if not self._run:
            return out
        base_out = out
        for name, w in self._run:
            adapter = self.adapters[name]
            delta = adapter.variant.forward(self, adapter, x, base_out)
            out = out + delta if w == 1.0 else out + w * delta
        return out

    def lean_factors(self) -> tuple[torch.Tensor, tuple | None] | None:
        """For the chunked LM-head loss (`lorakit.head.lean_head`): (the base weight, (A, B, s) of the one adapter now
        running, or None when none runs) where this layer computes exactly x·W0ᵀ + s·(x·Aᵀ)·Bᵀ: a frozen
        nn.Linear without bias, under one adapter whose variant keeps plain LoRA's forward, without dropout in
        training (the variant's `fused_factors`). Else None."""
        base = self.base_layer
        if type(base) is not nn.Linear or base.bias is not None or base.weight.requires_grad:
            return None
        if self.row_plan is not None or type(base.weight.data) is not torch.Tensor:
            return None
        if not self._run:
            return base.weight, None
        if len(self._run) > 1:
            return None
        name, w = self._run[0]
        adapter = self.adapters[name]
        factors = adapter.variant.fused_factors(adapter)  # the same question the fused kernels ask
        if factors is None:
            return None
        if self.training and isinstance(adapter.dropout, nn.Dropout) and adapter.dropout.p > 0:
            return None
        return base.weight, (*factors, adapter.scaling * w)

    def _fused(self, x: torch.Tensor) -> torch.Tensor | None:
        """One plain adapter on a frozen nn.Linear, or in training on a base whose handler gives its weight dense
        (a 4-bit one): the fused autograd function (None: take the plain path)."""
        name, w = self._run[0]
        adapter = self.adapters[name]
        factors = adapter.variant.fused_factors(adapter)
        if factors is None:
            return None
        A, B = factors
        drop = adapter.dropout.p if isinstance(adapter.dropout, nn.Dropout) else 0.0
        if not fused.can_fuse(self.base_layer, x, A):
            weight_of = self.handler.dense_weight(self.base_layer)
            if weight_of is None or not fused.can_fuse_dense(self.base_layer, x, A):
                return None
            bias = getattr(self.base_layer, "bias", None)
            return fused.lora_linear_dense(x, weight_of, bias, A, B, adapter.scaling * w, drop, self.training)
        if self.group is not None and fused.groups_enabled() and (drop == 0.0 or not self.training):
            y = self.group.forward(self, x)
            if y is not None:
                return y
        return fused.lora_linear(x, self.base_layer, A, B, adapter.scaling * w, drop, self.training)

    def extra_repr(self) -> str:
        return f"active={self.active}, merged={[m[0] for m in self.merged]}"
