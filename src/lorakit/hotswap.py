"""Hot-swapping: put another adapter file's weights into an adapter already on the model, in place (PEFT's
`hotswap_adapter`).

    lorakit.load_adapter(model, "adapters/fr")
    lorakit.prepare_hotswap(model, 32)         # optional, before compiling: room for adapters up to rank 32
    fast = torch.compile(model)
    lorakit.hotswap(fast, "adapters/de")       # same parameters, new values: no recompilation

The adapter keeps its name, its parameter objects (and so their storage) and its scaling s. What changes is their
values: the file's A goes into the first r_file rows of A, the file's B times s_file/s into the first r_file columns
of B, and the rest is zero. So s·B·A is the file's s_file·B_file·A_file, its alpha, rank and rsLoRA included, and
a `torch.compile`d model, whose graph holds the tensors and the constant s, computes the new adapter without
compiling again. PEFT turns the scalings into tensors for that (`prepare_model_for_compiled_hotswap`); folding the
ratio into B needs no such step. Its one rounding is B's product by s_file/s (1 when the two adapters share alpha
and rank). The file may adapt fewer modules than the adapter holds (the others compute their base alone) and a rank up to the
adapter's; `prepare_hotswap` pads the adapter with zeros to a larger rank first.

Plain LoRA and DoRA (magnitude copied too), on any base layer lorakit adapts, a 4-bit one included. Checked before
anything changes, and refused in one line naming the culprit: another variant or an init that changed W0 (either
side), a module the adapter does not hold, a rank above the adapter's, a merged adapter, copies of whole modules,
token rows, target_parameters, lora_bias, layer_replication.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import AdapterError
from lorakit.io import plan_adapter
from lorakit.layers import INIT_FACTORS, LoraAdapter, Variant
from lorakit.lora_format import LoraPlan
from lorakit.mixed import clear_row_cache
from lorakit.plain_lora import as_plain_lora
from lorakit.registry import adapter_layers, registry
from lorakit.variants.dora import DoraVariant, start_magnitude

_SWAPPABLE = (Variant, DoraVariant)  # exact classes: a subclass (DyLoRA, KaSA, ...) holds more than its pair
_PROBE = "__hotswap__"  # the name the file is planned under (a plan checks that the name is free)


def hotswap(
    model: nn.Module, path: str | os.PathLike, name: str = "default", *, allow_pickle: bool = False
) -> None:
    """Put the LoRA adapter at `path` (a PEFT folder, or a llama.cpp `.gguf` adapter) into adapter `name`'s
    tensors, in place. `model` may be the `torch.compile`d one. Everything is checked before anything changes."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    slot = _slot(model, name, "hotswap")
    if _PROBE in registry(model).adapters:
        raise AdapterError(f"hotswap plans the file as adapter {_PROBE!r}, which this model already has")
    plan = plan_adapter(model, path, _PROBE, allow_pickle=allow_pickle).payload
    source = Path(path)
    if not isinstance(plan, LoraPlan):
        raise AdapterError(f"{source}: hotswap takes LoRA adapters; this folder is another kind")
    cfg, copies = plan.config, plan.copies
    _refuse_config(cfg, str(source))
    if plan.variant is not None:
        raise AdapterError(f"{source}: a {plan.variant} adapter; hotswap takes plain LoRA and DoRA")
    if plan.saved or any(attr == "bias" for _, attr, _ in copies):
        raise AdapterError(
            f"{source}: holds module copies, token rows or biases beside its LoRA pairs; hotswap swaps pairs"
        )
    if (
        cfg.init in INIT_FACTORS
    ):  # PiSSA, OLoRA: as plain LoRA on the original W0 (rank 2r), as a frozen load does
        if cfg.pissa_niter:
            raise AdapterError(
                f"{source}: init_lora_weights='pissa_niter_{cfg.pissa_niter}'; load it instead"
            )
        cfg, copies = as_plain_lora(model, cfg, copies)
    found: dict[str, dict[str, torch.Tensor]] = {}
    for module, attr, tensor in copies:
        found.setdefault(module, {})[attr] = tensor
    dora = cfg.use_dora
    for module, ad in slot.items():
        if isinstance(ad.variant, DoraVariant) != dora:
            kind = "DoRA" if dora else "plain LoRA"
            raise AdapterError(f"{source}: a {kind} adapter, and adapter {name!r} is not ({module})")
    for module in found:
        if module not in slot:
            raise AdapterError(
                f"{source}: adapts {module}, which adapter {name!r} does not (hotswap adds no layers)"
            )
        r, have = cfg.rank_for(module), slot[module].r
        if r > have:
            raise AdapterError(
                f"{source}: r={r} at {module}, above adapter {name!r}'s r={have}; make room first with "
                f"lorakit.prepare_hotswap(model, {r}, {name!r}), before compiling"
            )
    # DoRA resets the magnitudes of the modules the file leaves out, which needs their layers
    layers = dict(adapter_layers(model, name)) if dora else {}
    with torch.no_grad():
        for module, ad in slot.items():
            tensors = found.get(module)
            ad.lora_A.zero_()
            ad.lora_B.zero_()
            if tensors is None:  # the module computes its base alone, as when the file is loaded afresh
                if dora:
                    ad.magnitude.copy_(start_magnitude(layers[module], ad))
                continue
            a, b = tensors["lora_A"], tensors["lora_B"]
            ratio = cfg.scaling_for(module) / ad.scaling
            ad.lora_A[: a.shape[0]].copy_(a.to(ad.lora_A.dtype))
            ad.lora_B[:, : b.shape[1]].copy_((b.float() * ratio).to(ad.lora_B.dtype))
            if dora:
                ad.magnitude.copy_(tensors["magnitude"].to(ad.magnitude.dtype))
    clear_row_cache(model)


def prepare_hotswap(model: nn.Module, r: int, name: str = "default") -> None:
    """Pad adapter `name` with zeros to rank `r` in every module, so that `hotswap` takes adapters up to rank `r`.
    The outputs stay the same, and so do the scalings (alpha becomes s·r, or s·√r with rsLoRA), and the adapter's
    config says so: saved again, it loads as it computes. Call it before `torch.compile`: it makes new tensors."""
    if hasattr(model, "_orig_mod"):
        raise AdapterError("prepare_hotswap makes new tensors: call it on the model before torch.compile")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterError(f"prepare_hotswap: r must be a positive integer, got {r!r}")
    slot = _slot(model, name, "prepare_hotswap")
    below = [m for m, ad in slot.items() if ad.r > r]
    if below:
        raise AdapterError(
            f"prepare_hotswap: adapter {name!r} has r={slot[below[0]].r} at {below[0]}, above {r}"
        )
    info = registry(model).adapters[name]
    rs = info.config.use_rslora
    alphas = {m: ad.scaling * (math.sqrt(r) if rs else r) for m, ad in slot.items()}
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = info.config.replace(
        r=r,
        rank_pattern={},
        alpha=alpha,
        alpha_pattern={re.escape(m): a for m, a in alphas.items() if a != alpha},
    )
    with torch.no_grad():
        for module, ad in slot.items():
            if ad.r < r:
                ad.lora_A = _padded(ad.lora_A, r, 0)
                ad.lora_B = _padded(ad.lora_B, r, 1)
            ad.r, ad.alpha = r, alphas[module]
    info.config = config
    clear_row_cache(model)


def _padded(p: nn.Parameter, r: int, dim: int) -> nn.Parameter:
    shape = list(p.shape)
    shape[dim] = r - shape[dim]
    return nn.Parameter(torch.cat([p.data, p.new_zeros(shape)], dim=dim), requires_grad=p.requires_grad)


def _slot(model: nn.Module, name: str, what: str) -> dict[str, LoraAdapter]:
    """Adapter `name`'s LoRA adapters by module, after the checks that it can take another adapter's values."""
    reg = registry(model)
    info = reg.adapters.get(name)
    if info is None:
        raise AdapterError(
            f"{what}: no adapter {name!r} on this model (it has {sorted(reg.adapters) or 'none'})"
        )
    _refuse_config(info.config, f"adapter {name!r}")
    if info.saved or info.tokens or info.params:
        raise AdapterError(
            f"{what}: adapter {name!r} holds module copies, token rows or parameters beside its pairs"
        )
    slot = {}
    for module, layer in adapter_layers(model, name):
        if any(m[0] == name for m in layer.merged):
            raise AdapterError(f"{what}: adapter {name!r} is merged into {module}; unmerge it first")
        ad = layer.adapters[name]
        if type(ad.variant) not in _SWAPPABLE:
            raise AdapterError(
                f"{what}: adapter {name!r} is {ad.variant.label} at {module}; hotswap takes plain LoRA and DoRA"
            )
        if ad.base_residual is not None or ad.start is not None or ad.on_remove is not None:
            raise AdapterError(
                f"{what}: adapter {name!r}'s init changed W0 at {module}; save and load it first"
            )
        slot[module] = ad
    return slot


def _refuse_config(config, who: str) -> None:
    """What a swap of pairs cannot carry: parts beside the pairs, or another variant."""
    for bad, why in (
        (config.lora_bias, "lora_bias"),
        (bool(config.layer_replication), "layer_replication"),
        (bool(config.target_parameters), "target_parameters"),
        (config.alora_invocation_tokens is not None, "aLoRA"),
        (config.use_kasa or config.use_bdlora is not None, "KaSA or BD-LoRA"),
        (
            config.ensure_weight_tying,
            "ensure_weight_tying (the tied head's pair is a view of the embedding's)",
        ),
    ):
        if bad:
            raise AdapterError(f"{who}: {why}; hotswap takes plain LoRA and DoRA pairs")
