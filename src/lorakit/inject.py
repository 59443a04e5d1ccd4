"""Put LoRA wrappers into a model, freeze the base, remove adapters, unload.

The model keeps a small registry (`model._lorakit`, lorakit.registry) with each adapter's config and the module
names it adapted, so that saving writes the exact target set and unloading restores the original `requires_grad`
flags.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection

from torch import nn

from lorakit.attention import set_lean_attention
from lorakit.blocks import set_lean_blocks
from lorakit.config import LoraConfig
from lorakit.control import merge as merge_active
from lorakit.control import set_active, unmerge
from lorakit.errors import AdapterError, TargetError
from lorakit.handlers import handler_for
from lorakit.layers import INIT_FROZEN, LoraLayer, Variant, variant_class
from lorakit.lean import set_lean_loss
from lorakit.params import (
    add_param_adapters,
    param_parameters,
    remove_param_adapters,
    select_params,
    unwrap_params,
)
from lorakit.registry import AdapterInfo, Registry, adapter_names, lora_layers, registry, uses_wrappers
from lorakit.replicate import replicate_layers, restore_layers
from lorakit.saved import (
    SavedModule,
    add_copies,
    check_targets,
    copy_parameters,
    remove_copies,
    unwrap_all,
)
from lorakit.siblings import assign_sibling_groups
from lorakit.targeting import select_modules, select_saved
from lorakit.task_types import CLASSIFICATION, task_heads, task_type_for
from lorakit.token_rows import TokenRows, add_token_rows, remove_token_rows, token_parameters, unwrap_tokens
from lorakit.tying import add_tied_adapter, add_tied_copy
from lorakit.tying import plan as tie_plan
from lorakit.walk import base_modules, base_parameters, set_submodule

log = logging.getLogger(__name__)

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
"""What an adapter's name on a model may be: it keys the LoRA layers' module dicts (no '.') and names folders."""


def inject(
    model: nn.Module,
    config: LoraConfig,
    name: str = "default",
    *,
    activate: bool = True,
    trainable: bool = True,
    variant: str | None = None,
    lean: bool = True,
    zeros: bool = False,
) -> nn.Module:
    """Add adapter `name` to every module `config` selects; freeze everything else. Returns `model` (changed in place).

    `variant`: the name of a registered LoRA variant (`lorakit.layers.register_variant`); None picks the one the
    config selects (DoRA with `use_dora`, else plain LoRA). All checks run before the model is touched: a bad
    name, no match, an unsupported layer or an unknown variant leaves it as it was.

    `config.modules_to_save` names modules the adapter trains and saves whole, in its own copy (PEFT's
    `modules_to_save`; lorakit.saved); by default a classification model's head.

    `lean` (default True): in training, a Hugging Face causal LM's own forward with `labels` computes its loss
    without building the logits (lorakit.lean), Llama-family SwiGLU, RMSNorm and RoPE blocks run in fewer passes
    and save less for backward (lorakit.blocks), and bf16 attention on the CPU takes the faster fp32 backward on short rows
    (lorakit.attention), in any training loop; all are exact to the dtype. False leaves the model's forwards as
    they are, and removes what an earlier `inject` installed.

    `zeros`: start A and B at zero instead of drawing the config's init, for a caller that writes every value next
    (`load_adapter` does). An init that changes the base weight or is a plug-in's (PiSSA, OLoRA, ...) still runs.
    """
    check_new_name(model, name)
    cls = variant_class(config, variant)
    created = "_lorakit" not in model.__dict__
    reg = registry(model, create=True)
    replicated = False
    try:
        replicated = replicate_layers(model, config.layer_replication, reg)  # first: the selection names new layers
        names = [] if config.target_parameters and not config.targets else select_modules(model, config)
        reason = cls.model_refusal(model)
        if reason:
            raise TargetError(f"cannot add {cls.label} to {type(model).__name__}: {reason}")
        modules = dict(base_modules(model))
        for n in names:
            module = modules[n]
            handler = handler_for(module)
            base = module.base_layer if isinstance(module, LoraLayer) else module
            reason = handler.check(base) or cls.refusal(handler)
            if reason:
                raise TargetError(f"cannot add LoRA to {n!r} ({type(module).__name__}): {reason}")
        saved = modules_to_save(model, config, names)
        tie = tie_plan(model, config, names, saved, plain=cls is Variant)
        names, saved = tie.names, tie.saved
        tokens, tied = token_plan(model, config, names, saved)
        params = param_plan(model, config, names, [*saved, *tokens, *tied])
    except BaseException:
        if replicated:
            restore_layers(model, reg)
        if created:
            del model.__dict__["_lorakit"]
        raise
    reg.layers = None
    try:
        add_copies(model, name, saved[:-1] if tie.copy else saved)
        if tie.copy:
            add_tied_copy(model, tie, name)
        add_token_rows(model, name, tokens, tied)
        add_param_adapters(model, name, params, config)
        modules = dict(base_modules(model))  # the copies and rows above are in place
        for n in names:
            layer = _wrap(model, n, modules)
            if tie.lora and n == tie.lora[1]:  # last: a view of the embedding's adapter
                add_tied_adapter(model, tie, name, config.dropout)
                continue
            layer.add_adapter(
                name,
                r=config.rank_for(n),
                alpha=config.alpha_for(n),
                scaling=config.scaling_for(n),
                dropout=config.dropout,
                init=config.init,
                variant=cls.create(config, n),
                config=config,
                zeros=zeros,
            )
    except Exception:
        _remove_from_layers(model, name)
        remove_copies(model, name)
        remove_token_rows(model, name)
        remove_param_adapters(model, name)
        reg.layers = None
        if not reg.adapters:
            restore_layers(model, reg)
            del model.__dict__["_lorakit"]
        raise
    reg.layers = None
    assign_sibling_groups(list(lora_layers(model)))
    reg.adapters[name] = AdapterInfo(
        config=config, modules=names, trainable=trainable, saved=saved, tokens=tokens, params=params
    )
    cls.attach(model, name)
    set_trainable(model, only=[name])
    if activate:
        set_active(model, name)
    set_lean_loss(model, lean)
    set_lean_blocks(model, lean)
    set_lean_attention(model, lean)
    log.info("injected adapter %r into %d modules", name, len(names))
    return model


def modules_to_save(model: nn.Module, config: LoraConfig, lora_modules: list[str]) -> list[str]:
    """The modules an adapter with `config` saves whole: those `config.modules_to_save` names (each must match),
    or by default the head of a classification model that LoRA does not adapt (PEFT adds it the same way)."""
    if config.modules_to_save is None:
        task = config.task_type or task_type_for(model)
        if task not in CLASSIFICATION:
            return []
        names = select_saved(model, sorted(task_heads(model, task)), strict=False)
        return [n for n in names if not any(m == n or m.startswith(n + ".") for m in lora_modules)]
    names = select_saved(model, config.modules_to_save)
    check_targets(model, names, lora_modules)
    return names


def param_plan(
    model: nn.Module, config: LoraConfig, lora_modules: list[str], others: list[str]
) -> dict[str, list[str]]:
    """{owner module: [its parameters]} that `config.target_parameters` adapts; `others`: modules saved whole or
    with token rows, which cannot also hold adapted parameters."""
    if not config.target_parameters:
        return {}
    wrapped = [n for n, m in base_modules(model) if isinstance(m, (LoraLayer, SavedModule, TokenRows))]
    plan = select_params(model, config.target_parameters, inner=wrapped)
    for m in plan:
        module = model.get_submodule(m)
        clash = [o for o in [*lora_modules, *others] if o == m or o.startswith(m + ".") or m.startswith(o + ".")]
        if clash or isinstance(module, (LoraLayer, SavedModule, TokenRows)):
            raise TargetError(
                f"target_parameters: {m!r} is also adapted with LoRA, saved whole or trained by rows "
                f"({(clash or [m])[0]!r}); adapt its parameters or the module, not both"
            )
    return plan


def token_plan(
    model: nn.Module, config: LoraConfig, lora_modules: list[str], saved: list[str]
) -> tuple[dict[str, list[int]], list[str]]:
    """({module: token ids} an adapter with `config` trains row by row, [output heads tied to those rows]).

    A list of ids means the input embedding (and, when the output head shares its weight, the head too, as in
    PEFT); a dict names modules as `modules_to_save` does. Every id must be a row of its module."""
    spec = config.trainable_token_indices
    if spec is None:
        return {}, []
    key = "trainable_token_indices"
    if isinstance(spec, list):
        get = getattr(model, "get_input_embeddings", None)
        embedding = get() if callable(get) else None
        where = next((n for n, m in base_modules(model) if m is embedding and n), None)
        if where is None:
            raise TargetError(
                f"{key}: {type(model).__name__} has no input embedding; name the module in a dict"
            )
        plan = {where: list(spec)}
    else:
        plan = {}
        for want, ids in spec.items():
            for m in select_saved(model, [want], what=key):
                plan[m] = list(ids)
    for m, ids in plan.items():
        module = model.get_submodule(m)
        base = module.base_layer if isinstance(module, TokenRows) else module
        if not isinstance(base, (nn.Embedding, nn.Linear)):
            raise TargetError(f"{key}: {m!r} is a {type(base).__name__}, not an embedding or a linear head")
        if m in saved or any(lm == m or lm.startswith(m + ".") for lm in lora_modules):
            raise TargetError(f"{key}: {m!r} is also saved whole or adapted with LoRA; give it one of them")
        rows = base.weight.shape[0]
        bad = [i for i in ids if i >= rows]
        if bad:
            raise TargetError(
                f"{key}: token id {bad[0]} is out of range for {m!r} ({rows} rows); resize the model's embeddings "
                "to the tokenizer first (model.resize_token_embeddings(len(tokenizer)))"
            )
    tied = []
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is not None and embedding is not None:
        e = embedding.base_layer if isinstance(embedding, TokenRows) else embedding
        h = head.base_layer if isinstance(head, TokenRows) else head
        head_name = next(n for n, m in base_modules(model) if m is head)
        emb_name = next(n for n, m in base_modules(model) if m is embedding)
        if getattr(h, "weight", None) is e.weight and emb_name in plan:
            if head_name in plan:
                raise TargetError(
                    f"{key}: {head_name!r} shares its weight with {emb_name!r}; name the embedding only"
                )
            if head_name in saved or any(lm == head_name for lm in lora_modules):
                raise TargetError(
                    f"{key}: {head_name!r} shares its weight with {emb_name!r}, and is also saved whole or adapted "
                    "with LoRA; give it one of them"
                )
            tied.append(head_name)
    return plan, tied


def check_new_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not ADAPTER_NAME.match(name):
        raise AdapterError(f"adapter name {name!r} must be letters, digits, '_' or '-'")
    if name in adapter_names(model):
        raise AdapterError(
            f"adapter {name!r} already exists on {type(model).__name__}; delete it or pick another name"
        )


def set_trainable(model: nn.Module, only: Collection[str] | None = None) -> None:
    """Freeze the base; make trainable the adapters marked trainable (but the factors their init fixes, MiCA's B)
    and the biases their `bias` setting names.

    `only`: set the flags of those adapters alone, and leave the others' as an earlier call set them (their marks
    have not changed): what a new adapter needs (or, empty, a deleted one), at a cost that does not grow with the
    adapters loaded. The base is frozen (and the biases set) either way."""
    reg = registry(model)
    for _, p in base_parameters(model):  # the per-adapter tensors are not among them: each is set below
        p.requires_grad_(False)
    names = list(reg.adapters) if only is None else list(only)
    for _, layer in lora_layers(model) if names else ():
        for aname in names:
            if aname in layer.adapters:
                info = reg.adapters[aname]
                layer.adapters[aname].requires_grad_(info.trainable)
                for attr in INIT_FROZEN.get(info.config.init, ()):  # MiCA's B
                    getattr(layer.adapters[aname], attr).requires_grad_(False)
    if uses_wrappers(model):
        for aname in names:
            info = reg.adapters[aname]
            for p in [*copy_parameters(model, aname), *token_parameters(model, aname), *param_parameters(model, aname)]:
                p.requires_grad_(info.trainable)
    for info in reg.adapters.values():
        if not info.trainable:
            continue
        if info.config.bias == "all":
            for pname, p in base_parameters(model):
                if pname == "bias" or pname.endswith(".bias"):
                    p.requires_grad_(True)
        elif info.config.bias == "lora_only":
            for n in info.modules:
                bias = getattr(model.get_submodule(n).base_layer, "bias", None)
                if bias is not None:
                    bias.requires_grad_(True)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` everywhere (unmerging first if needed). Wrappers left with no adapter are unwrapped."""
    reg = registry(model)
    if name not in reg.adapters:
        raise AdapterError(f"no adapter {name!r} on {type(model).__name__}; adapters: {list(reg.adapters)}")
    unmerge(model)
    _remove_from_layers(model, name)
    remove_copies(model, name)
    remove_token_rows(model, name)
    remove_param_adapters(model, name)
    reg.layers = None
    assign_sibling_groups(list(lora_layers(model)))
    del reg.adapters[name]
    reg.active.pop(name, None)
    if not reg.adapters:
        restore_layers(model, reg)
        _restore_requires_grad(model, reg)
        del model.__dict__["_lorakit"]
        set_lean_loss(model, False)
        set_lean_blocks(model, False)
        set_lean_attention(model, False)
    else:
        set_trainable(model, only=())  # the others' flags are as they were; the base and the biases are set again


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove all LoRA wrappers. With `merge`, the active adapters are folded into the base weights first.

    Returns the plain model (the same object), with the base parameters' original `requires_grad` flags. A module
    an adapter saves whole (modules_to_save) becomes, with `merge`, the active adapter's copy, else the original;
    rows an adapter trains alone (trainable_token_indices) are, with `merge`, written into the embedding.
    """
    reg = registry(model)
    (merge_active if merge else unmerge)(model)
    unwrap_all(model, merge)
    unwrap_tokens(model, merge)
    unwrap_params(model, merge)
    for name, layer in list(lora_layers(model)):
        merged = {m[0] for m in layer.merged}
        for aname in list(layer.adapters):
            if aname not in merged:  # gives back what PiSSA moved from W0 into B·A
                layer.remove_adapter(aname)
        set_submodule(model, name, layer.base_layer)
    restore_layers(model, reg)
    _restore_requires_grad(model, reg)
    del model.__dict__["_lorakit"]
    set_lean_loss(model, False)
    set_lean_blocks(model, False)
    set_lean_attention(model, False)
    return model


def _wrap(model: nn.Module, name: str, modules: dict[str, nn.Module]) -> LoraLayer:
    """The LoRA layer at `name`, wrapping the module there first if needed; `modules`: the model's, by name."""
    module = modules[name]
    if isinstance(module, LoraLayer):
        return module
    layer = LoraLayer(module, handler_for(module))
    parent, _, child = name.rpartition(".")
    setattr(modules[parent], child, layer)
    modules[name] = layer
    return layer


def _remove_from_layers(model: nn.Module, name: str) -> None:
    for lname, layer in list(lora_layers(model)):
        if name in layer.adapters:
            layer.remove_adapter(name)
        if not layer.adapters:
            set_submodule(model, lname, layer.base_layer)


def _restore_requires_grad(model: nn.Module, reg: Registry) -> None:
    for pname, p in model.named_parameters():
        key = pname.replace(".base_layer.", ".")
        p.requires_grad_(reg.requires_grad.get(pname, reg.requires_grad.get(key, p.requires_grad)))
