"""What adapters train beyond LoRA pairs: whole modules (PEFT's `modules_to_save`: a classification head, or
`lm_head`) and single embedding rows (PEFT's `trainable_token_indices`: new special tokens; `lorakit.token_rows`).

A `SavedModule` wraps the model's module where it sits and keeps one trainable copy per adapter that saves it:

    forward(x) = modules_to_save[a](x)     if the active adapter a has a copy here
               = original_module(x)        otherwise (no adapter active here, or adapters disabled)

The attribute names are PEFT's (`original_module`, `modules_to_save.<adapter>`), so a PEFT user finds what they
expect. At most one active adapter may have a copy of the same module, as in PEFT: a copy replaces the module, so
two copies, or one copy at a weight other than 1, have no meaning; `check_activation` refuses them. In a
mixed-adapter batch each row runs through its own adapter's copy (or the original).

Attribute reads that the wrapper itself lacks (`weight`, `out_features`, ...) go to the module now in use, so code
that inspects `model.score.weight` keeps working.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import ClassVar

import torch
from torch import nn

from lorakit.errors import AdapterError, TargetError
from lorakit.token_rows import TokenRows
from lorakit.walk import Wrapper, base_modules, set_submodule


class SavedModule(Wrapper):
    """A module with per-adapter trainable copies (PEFT's ModulesToSaveWrapper)."""

    _inner = "original_module"
    per_adapter: ClassVar[tuple[str, ...]] = ("modules_to_save",)  # not walked by lorakit.walk.base_modules

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False
        self.row_names: Sequence[str | None] | None = None  # set by lorakit.row_adapters: one adapter per row

    def add(self, name: str) -> nn.Module:
        """Give adapter `name` its own copy of the original module (trainable, like the original's dtype)."""
        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = clone
        return clone

    def current(self) -> nn.Module:
        if self.disabled or self.active is None:
            return self.original_module
        return self.modules_to_save[self.active]

    def forward(self, *args, **kwargs):
        if self.row_names is not None and not self.disabled:
            return self._rows_forward(*args, **kwargs)
        return _run(self.current(), *args, **kwargs)

    def _rows_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = [n if n in self.modules_to_save else None for n in self.row_names]
        if len(names) != x.shape[0]:
            raise AdapterError(f"row adapters: {len(names)} row adapters for a batch of {x.shape[0]}")
        groups = list(dict.fromkeys(names))
        if len(groups) == 1:
            module = self.original_module if groups[0] is None else self.modules_to_save[groups[0]]
            return _run(module, x, *args, **kwargs)
        out = None
        for g in groups:
            rows = torch.tensor([i for i, n in enumerate(names) if n == g], device=x.device)
            module = self.original_module if g is None else self.modules_to_save[g]
            y = _run(module, x.index_select(0, rows), *args, **kwargs)
            if not isinstance(y, torch.Tensor):
                raise AdapterError(
                    f"row adapters: {type(self.original_module).__name__} returns {type(y).__name__}, not a "
                    "tensor; its modules_to_save copies cannot be split by row"
                )
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out.index_copy_(0, rows, y)
        return out

    def target(self) -> nn.Module:
        return self.current()

    def extra_repr(self) -> str:
        return f"copies={list(self.modules_to_save)}, active={self.active!r}"


def _run(module: nn.Module, *args, **kwargs):
    """`module(x, ...)`, where a copy whose weights are in another dtype than `x` (an adapter's float32 copy on
    a 16-bit base, `lorakit.device.upcast_trainable`) computes in its own dtype and answers in `x`'s, as the
    base's module would; under autocast, autocast decides."""
    x = args[0] if args else None
    p = next(module.parameters(), None)
    if (
        p is None
        or not isinstance(x, torch.Tensor)
        or not x.is_floating_point()
        or x.dtype == p.dtype
        or torch.is_autocast_enabled(x.device.type)
    ):
        return module(*args, **kwargs)
    y = module(x.to(p.dtype), *args[1:], **kwargs)
    return y.to(x.dtype) if isinstance(y, torch.Tensor) and y.is_floating_point() else y


def in_saved_module(name: str) -> bool:
    """Whether parameter or module `name` lies inside a SavedModule (its original or a copy)."""
    return (
        ".modules_to_save." in name
        or ".original_module." in name
        or name.startswith(("modules_to_save.", "original_module."))
    )


def original(module: nn.Module) -> nn.Module:
    """The model's own module behind a SavedModule (the module itself otherwise)."""
    return module.original_module if isinstance(module, SavedModule) else module


def saved_modules(model: nn.Module) -> Iterator[tuple[str, SavedModule]]:
    """(name, wrapper) for every SavedModule in `model`."""
    for n, m in base_modules(model):
        if isinstance(m, SavedModule):
            yield n, m


def check_targets(model: nn.Module, modules: Sequence[str], lora_modules: Sequence[str]) -> None:
    """Refuse a module that is both LoRA-adapted and saved whole, or one that lies inside another saved module."""
    for m in modules:
        for lm in lora_modules:
            if lm == m or lm.startswith(m + ".") or m.startswith(lm + "."):
                raise TargetError(
                    f"modules_to_save: {m!r} is also adapted with LoRA ({lm!r}); save it whole or adapt it, not both"
                )
        for other in modules:
            if other != m and m.startswith(other + "."):
                raise TargetError(f"modules_to_save: {m!r} lies inside {other!r}; name one of them")


def add_copies(model: nn.Module, adapter: str, modules: Sequence[str]) -> None:
    """Wrap `modules` (where not wrapped yet) and give adapter `adapter` a copy of each."""
    for m in modules:
        wrapper = model.get_submodule(m)
        if not isinstance(wrapper, SavedModule):
            wrapper = SavedModule(wrapper)
            set_submodule(model, m, wrapper)
        wrapper.add(adapter)


def remove_copies(model: nn.Module, adapter: str, *, keep: str | None = None) -> None:
    """Drop adapter `adapter`'s copies; a wrapper left with none is replaced by its original module, or, when
    `keep` names an adapter (unload with merge), by that adapter's copy."""
    for n, wrapper in list(saved_modules(model)):
        if adapter in wrapper.modules_to_save:
            del wrapper.modules_to_save[adapter]
            if wrapper.active == adapter:
                wrapper.active = None
        if not len(wrapper.modules_to_save):
            set_submodule(model, n, wrapper.original_module)


def unwrap_all(model: nn.Module, merge: bool) -> None:
    """Replace every wrapper by the module in use (`merge`: the active adapter's copy) or by the original."""
    wrappers = list(saved_modules(model))
    chosen = [w.current() if merge else w.original_module for _, w in wrappers]
    held: dict[int, int] = {}  # parameter -> how many chosen modules hold it (ensure_weight_tying: 2)
    for m in chosen:
        for p in m.parameters():
            held[id(p)] = held.get(id(p), 0) + 1
    for (n, wrapper), m in zip(wrappers, chosen, strict=True):
        if m is not wrapper.original_module and all(held[id(p)] == 1 for p in m.parameters()):
            _untie(model, wrapper.original_module, m)
        set_submodule(model, n, m)


def _untie(model: nn.Module, original: nn.Module, chosen: nn.Module) -> None:
    """A copy that replaces a tied module (lm_head tied to the input embedding) leaves it untied for good."""
    cfg = getattr(model, "config", None)
    shared = {id(p) for p in original.parameters()}
    others = [p for n, p in model.named_parameters(remove_duplicate=False) if id(p) in shared]
    if len(others) > len(shared) and getattr(cfg, "tie_word_embeddings", False):
        cfg.tie_word_embeddings = False


def _owners(wrapper: nn.Module) -> Sequence[str]:
    return wrapper.modules_to_save if isinstance(wrapper, SavedModule) else wrapper.token_indices


def _wrappers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for n, m in base_modules(model):
        if isinstance(m, (SavedModule, TokenRows)):
            yield n, m


def check_activation(model: nn.Module, wanted: dict[str, float]) -> None:
    """Refuse an active set in which two adapters have copies of one module (or rows of one embedding), or such
    an adapter has a weight other than 1 (a copy replaces the module: it cannot be added to another, nor scaled)."""
    for n, wrapper in _wrappers(model):
        what = "copy of" if isinstance(wrapper, SavedModule) else "token rows in"
        key = "modules_to_save" if isinstance(wrapper, SavedModule) else "trainable_token_indices"
        owners = [a for a in wanted if a in _owners(wrapper)]
        if len(owners) > 1:
            raise AdapterError(
                f"adapters {owners[0]!r} and {owners[1]!r} both have their own {what} {n!r} ({key}); "
                "activate one of them at a time"
            )
        if owners and wanted[owners[0]] != 1.0:
            raise AdapterError(
                f"adapter {owners[0]!r} has its own {what} {n!r} ({key}), which cannot be weighted; "
                f"activate it with weight 1, not {wanted[owners[0]]}"
            )


def activate(model: nn.Module, wanted: dict[str, float]) -> None:
    """Point every wrapper at the active adapter that has a copy or rows there (after `check_activation`)."""
    for _, wrapper in _wrappers(model):
        wrapper.active = next((a for a in wanted if a in _owners(wrapper)), None)


def set_disabled(model: nn.Module, disabled: bool, *, walk: bool = True) -> None:
    if not walk:
        return
    for _, wrapper in _wrappers(model):
        wrapper.disabled = disabled


def set_rows(model: nn.Module, names: Sequence[str | None] | None) -> None:
    for _, wrapper in _wrappers(model):
        wrapper.row_names = names


def copies_of(model: nn.Module, adapter: str) -> dict[str, nn.Module]:
    """Module name -> adapter `adapter`'s copy of it."""
    return {n: w.modules_to_save[adapter] for n, w in saved_modules(model) if adapter in w.modules_to_save}


def copy_parameters(model: nn.Module, adapter: str | None = None) -> Iterator[nn.Parameter]:
    """The parameters of the copies of adapter `adapter` (of all adapters if None)."""
    for _, wrapper in saved_modules(model):
        for a, module in wrapper.modules_to_save.items():
            if adapter is None or a == adapter:
                yield from module.parameters()
