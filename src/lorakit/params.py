"""LoRA on parameters that are no `nn.Linear`: PEFT's `target_parameters`, for mixture-of-experts layers whose
experts are one 3-D parameter (transformers' `MixtralExperts.gate_up_proj`, shape (experts, out, in)), and for
any 2-D `nn.Parameter` a user names.

A `ParamLora` wraps the module that owns the parameters and holds, per adapter and parameter, PEFT's factors:

    lora_A (r·E, in), lora_B (out, r·E), E experts (1 for a 2-D parameter)
    ΔW[e] = s · B_e · A_e,   A_e = lora_A.reshape(E, r, in)[e],   B_e = lora_B.reshape(out, r, E)[:, :, e]

(PEFT's own layout, so that its files load as they are). The forward runs the owner with W + Σ w_a·ΔW_a in place
of each adapted parameter (`torch.func.functional_call`; the module's own code is unchanged). A parameter stored
(experts, in, out) (`is_transposed`, e.g. GPT-OSS) gets ΔW in that layout.

The file keys follow PEFT's nesting: PEFT wraps the owner once per parameter, in the owner's parameter order, so
the last adapted parameter's factors are `<owner>.lora_A.weight`, the one before it
`<owner>.base_layer.lora_A.weight`, and so on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import nn

from lorakit.errors import AdapterError, TargetError
from lorakit.walk import Wrapper, base_modules, set_submodule


class ParamFactors(nn.Module):
    """One adapter's LoRA on one parameter."""

    def __init__(self, shape: torch.Size, r: int, alpha: float, scaling: float, transposed: bool, init: str):
        super().__init__()
        if len(shape) == 3:
            experts, first, second = shape
            out_f, in_f = (second, first) if transposed else (first, second)
        elif len(shape) == 2:
            experts, (out_f, in_f) = 1, shape
        else:
            raise TargetError(f"target_parameters: a {len(shape)}-D parameter; only 2-D and 3-D ones are supported")
        self.experts, self.r, self.alpha, self.scaling = experts, r, alpha, scaling
        self.two_d = len(shape) == 2
        self.transposed = transposed and len(shape) == 3
        self.lora_A = nn.Parameter(torch.empty(r * experts, in_f))
        self.lora_B = nn.Parameter(torch.zeros(out_f, r * experts))
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / r)
        else:  # PEFT's default: Kaiming-uniform A (a=√5, as nn.Linear), zero B
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta(self) -> torch.Tensor:
        """ΔW in the parameter's own layout."""
        if self.two_d:
            return (self.lora_B @ self.lora_A) * self.scaling
        a = self.lora_A.reshape(self.experts, -1, self.lora_A.shape[-1])  # (E, r, in)
        b = self.lora_B.reshape(self.lora_B.shape[0], -1, self.experts)  # (out, r, E)
        spec = "ore,eri->eio" if self.transposed else "ore,eri->eoi"
        return torch.einsum(spec, b, a) * self.scaling


class ParamLora(Wrapper):
    """The owner of adapted parameters, with each adapter's factors: `lora[adapter][parameter]`."""

    per_adapter: ClassVar[tuple[str, ...]] = ("lora",)  # what lorakit.walk.base_modules does not walk

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora = nn.ModuleDict()
        self.active: dict[str, float] = {}
        self.disabled = False
        self.merged: list[tuple[str, float]] = []  # merged (adapter, weight), oldest first

    def add(self, name: str, params: list[str], r: int, alpha: float, scaling: float, init: str) -> None:
        transposed = bool(getattr(self.base_layer, "is_transposed", False))
        factors = nn.ModuleDict()
        for p in params:
            weight = getattr(self.base_layer, p)
            f = ParamFactors(weight.shape, r, alpha, scaling, transposed, init)
            factors[p] = f.to(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else None)
        self.lora[name] = factors

    def deltas(self) -> dict[str, torch.Tensor]:
        """Parameter name -> W + Σ w·ΔW over the active, unmerged adapters."""
        out: dict[str, torch.Tensor] = {}
        merged = {n for n, _ in self.merged}
        for name, w in self.active.items():
            if name not in self.lora or name in merged:
                continue
            for p, f in self.lora[name].items():
                base = out.get(p, getattr(self.base_layer, p))
                out[p] = base + (f.delta() * w).to(base.dtype)
        return out

    def forward(self, *args, **kwargs):
        if self.disabled:
            if self.merged:
                raise AdapterError("cannot disable merged target_parameters adapters; unmerge(model) first")
            return self.base_layer(*args, **kwargs)
        overrides = self.deltas()
        if not overrides:
            return self.base_layer(*args, **kwargs)
        return torch.func.functional_call(self.base_layer, overrides, args, kwargs, strict=False)

    @torch.no_grad()
    def merge(self) -> None:
        merged = {n for n, _ in self.merged}
        todo = [(n, w) for n, w in self.active.items() if n in self.lora and n not in merged]
        new = self.deltas()  # every result checked before any parameter changes
        for p, value in new.items():
            if not torch.isfinite(value).all():
                raise AdapterError(f"merging adapters {[n for n, _ in todo]} into {p} gives non-finite weights")
        for p, value in new.items():
            getattr(self.base_layer, p).copy_(value)
        self.merged += todo

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged:
            name, w = self.merged.pop()
            for p, f in self.lora[name].items():
                weight = getattr(self.base_layer, p)
                weight.sub_((f.delta() * w).to(weight.dtype))

    def extra_repr(self) -> str:
        return f"adapters={ {a: list(f) for a, f in self.lora.items()} }, active={self.active}"


def param_wrappers(model: nn.Module) -> Iterator[tuple[str, ParamLora]]:
    for n, m in base_modules(model):
        if isinstance(m, ParamLora):
            yield n, m


def select_params(model: nn.Module, names: list[str], inner: list[str]) -> dict[str, list[str]]:
    """{owner module: [parameter names, in the owner's order]} that `names` select, PEFT's rule: the full name
    `<module>.<parameter>` equals a name or ends with "." + it. `inner`: module names whose insides are not
    candidates (LoRA layers, saved modules). Every name must select a parameter."""
    found: dict[str, list[str]] = {}
    hit = set()
    wrapped = [w for w, _ in param_wrappers(model)]
    for mname, module in base_modules(model):
        if not mname or any(mname == i or mname.startswith(i + ".") for i in inner):
            continue
        if any(mname.startswith(w + ".") for w in wrapped):  # a wrapper's insides: its owner is seen as itself
            continue
        owner = module.base_layer if isinstance(module, ParamLora) else module
        for pname, _ in owner.named_parameters(recurse=False):
            full = f"{mname}.{pname}"
            for want in names:
                if full == want or full.endswith("." + want):
                    found.setdefault(mname, [])
                    if pname not in found[mname]:
                        found[mname].append(pname)
                    hit.add(want)
    for want in names:
        if want not in hit:
            near = [n for n, _ in base_modules(model) if n and (n == want or n.endswith("." + want))]
            hint = f" ({near[0]!r} is a module: name its parameter, e.g. {want}.weight)" if near else ""
            raise TargetError(f"target_parameters: {want!r} matches no parameter of {type(model).__name__}{hint}")
    for mname, params in found.items():  # the owner's own order (PEFT nests its wrappers in it)
        owner = model.get_submodule(mname)
        owner = owner.base_layer if isinstance(owner, ParamLora) else owner
        order = [p for p, _ in owner.named_parameters(recurse=False)]
        found[mname] = sorted(params, key=order.index)
    return found


def factor_shapes(weight: torch.Tensor, r: int, transposed: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (lora_A, lora_B) shapes of a rank-`r` LoRA on parameter `weight`."""
    if weight.dim() == 2:
        experts, (out_f, in_f) = 1, weight.shape
    else:
        experts, first, second = weight.shape
        out_f, in_f = (second, first) if transposed else (first, second)
    return (r * experts, in_f), (out_f, r * experts)


def file_keys(owner: str, params: list[str]) -> dict[str, str]:
    """Parameter -> the module path PEFT's nesting gives its factors: the last parameter at `owner`, each earlier
    one a `.base_layer` deeper."""
    n = len(params)
    return {p: owner + ".base_layer" * (n - 1 - i) for i, p in enumerate(params)}


def add_param_adapters(model: nn.Module, adapter: str, plan: dict[str, list[str]], config) -> None:
    for m, params in plan.items():
        wrapper = model.get_submodule(m)
        if not isinstance(wrapper, ParamLora):
            wrapper = ParamLora(wrapper)
            set_submodule(model, m, wrapper)
        wrapper.add(adapter, params, config.rank_for(m), config.alpha_for(m), config.scaling_for(m), config.init)


def remove_param_adapters(model: nn.Module, adapter: str) -> None:
    for n, wrapper in list(param_wrappers(model)):
        if adapter in wrapper.lora:
            del wrapper.lora[adapter]
            wrapper.active.pop(adapter, None)
        if not len(wrapper.lora):
            set_submodule(model, n, wrapper.base_layer)


def unwrap_params(model: nn.Module, merge: bool) -> None:
    for n, wrapper in list(param_wrappers(model)):
        if merge:
            wrapper.merge()
        else:
            wrapper.unmerge()
        set_submodule(model, n, wrapper.base_layer)


def param_parameters(model: nn.Module, adapter: str | None = None) -> Iterator[nn.Parameter]:
    for _, wrapper in param_wrappers(model):
        for a, factors in wrapper.lora.items():
            if adapter is None or a == adapter:
                yield from factors.parameters()
