"""Combine LoRA adapters into one new adapter, from their files alone (no base model needed).

Every method reasons about each module's update seen as a matrix (out_features, fan_in):
ΔW_i = s_i · B_i · A_i, with each source's *own* scaling s_i = α_i/r_i (α_i/√r_i with rsLoRA), per module
(rank_pattern, alpha_pattern). The result is always written with scaling 1 (alpha = r, no rsLoRA, a
rank_pattern/alpha_pattern entry for every module whose rank differs from the default), so nothing of the
sources' α, r or rsLoRA has to survive in the output config.

    cat              A = [A_1; …; A_n], B = [w_1 s_1 B_1 … w_n s_n B_n], r = Σ r_i: exact, ΔW = Σ w_i ΔW_i
    linear           A = Σ ±√|w_i s_i|·A_i, B = Σ √|w_i s_i|·B_i (PEFT's "linear"): equal ranks, NOT exact
    svd              Σ w_i ΔW_i, truncated SVD
    ties             TIES-Merging (Yadav et al. 2023) of τ_i = w_i ΔW_i: trim, elect sign, disjoint mean; SVD
    dare_linear      DARE (Yu et al. 2023): Σ w_i · (m_i ⊙ ΔW_i)/density, m_i ~ Bernoulli(density); SVD
    dare_ties        DARE masks, then TIES' sign election and disjoint mean; SVD
    magnitude_prune  Σ w_i · trim(ΔW_i): top-density magnitudes of each; SVD

A module missing from some source is an error, unless `allow_missing`: it then counts as ΔW = 0 there.
Sources with a bias on B (PEFT's `lora_bias`) add s_i·b_i to a module's output; the result carries
b = Σ w_i s_i b_i on each module (zero where no source has one), whatever the method: a bias is a vector, which
no method needs to truncate, trim or drop.
A module that one source saves whole (PEFT's modules_to_save, e.g. a classification head) is carried into the
result unchanged, if that source's weight is 1; two sources saving the same module whole cannot be combined (there
is no sum of two replaced modules), and the error names the module.
The dense methods compute ΔW in float64 and write A, B in the sources' (promoted) dtype. The arithmetic on each
module is `lorakit.combine_math`; this module reads, checks and writes the adapters.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from lorakit.atomic import atomic_dir
from lorakit.combine_math import Lora, combine_module
from lorakit.config import LoraConfig
from lorakit.errors import AdapterError, AdapterFileError, ConfigError
from lorakit.formats import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from lorakit.layers import INIT_FACTORS
from lorakit.lora_format import TOKEN_KEY, read_adapter, saved_tensors, token_tensors
from lorakit.peft_keys import TRAINING_ONLY_TENSORS
from lorakit.tying import retie, tied_heads
from lorakit.variants.bdlora import BdLoraVariant

log = logging.getLogger(__name__)

METHODS = ("cat", "linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd", *DENSITY_METHODS)
SIGN_METHODS = ("total", "frequency")
RECORD_NAME = "combine.json"
_KEYS = {  # file key suffix -> (A or B, embedding?)
    "lora_A.weight": ("A", False),
    "lora_B.weight": ("B", False),
    "lora_embedding_A": ("A", True),
    "lora_embedding_B": ("B", True),
}

Source = tuple[LoraConfig, dict[str, torch.Tensor]]

# Settings every combined adapter must share, as the result keeps them: why adapters that differ cannot combine
_SHARED = {
    "layer_replication": "adapters on differently replicated layers cannot be combined",  # keys name other layers
    "alora_invocation_tokens": "aLoRA adapters combine only with adapters invoked by the same tokens",
    "ensure_weight_tying": "an adapter whose head is its embedding's transpose combines only with others so tied",
}


def combine(
    sources: Sequence[str | os.PathLike],
    weights: Sequence[float] | None,
    method: str,
    out: str | os.PathLike,
    *,
    density: float | None = None,
    svd_rank: int | None = None,
    majority_sign_method: str = "total",
    seed: int = 0,
    allow_missing: bool = False,
    ignore_base_model: bool = False,
    allow_pickle: bool = False,
) -> Path:
    """Combine the adapter folders `sources` into a new adapter folder `out` (written atomically). Returns `out`.

    `weights` (default: 1 each) multiply each source's ΔW. Everything is read and checked before anything is
    written: on any error `out` is left as it was. See `combine_tensors` for the options.
    """
    if isinstance(sources, (str, os.PathLike)):
        raise ConfigError(f"sources must be a list of adapter folders, got the single path {str(sources)!r}")
    out = Path(out)
    _check_options(len(sources), weights, method, density, svd_rank, majority_sign_method)
    if out.exists() and not out.is_dir():
        raise AdapterFileError(f"{out}: exists and is not a folder")
    loaded = [read_adapter(p, allow_pickle=allow_pickle) for p in sources]
    config, tensors = combine_tensors(
        loaded,
        weights,
        method,
        density=density,
        svd_rank=svd_rank,
        majority_sign_method=majority_sign_method,
        seed=seed,
        allow_missing=allow_missing,
        ignore_base_model=ignore_base_model,
        names=[str(p) for p in sources],
    )
    record = {
        "method": method,
        "sources": [str(p) for p in sources],
        "weights": [float(w) for w in weights] if weights is not None else None,
        "density": density,
        "svd_rank": svd_rank,
        "majority_sign_method": majority_sign_method,
        "seed": seed,
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config.to_peft_dict(), indent=2, sort_keys=True) + "\n")
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")

    atomic_dir(out, write, keep_others=True)
    log.info("combined %d adapters with %s into %s (%d tensors)", len(sources), method, out, len(tensors))
    return out


@torch.no_grad()
def combine_tensors(
    sources: Sequence[Source],
    weights: Sequence[float] | None = None,
    method: str = "cat",
    *,
    density: float | None = None,
    svd_rank: int | None = None,
    majority_sign_method: str = "total",
    seed: int = 0,
    allow_missing: bool = False,
    ignore_base_model: bool = False,
    names: Sequence[str] | None = None,
) -> Source:
    """Combine adapters given as (config, tensors) pairs (PEFT file keys). Returns the new (config, tensors).

    density: fraction of ΔW entries kept, in (0, 1]; required by ties, dare_linear, dare_ties, magnitude_prune.
    svd_rank: rank of the truncated SVD ending the dense methods (default: per module, the largest source rank
        there); capped at min(out, fan_in). The factors are balanced: B = U·√S, A = √S·Vᵀ.
    majority_sign_method: TIES sign election by "total" mass Σ τ_i or by "frequency" Σ sign(τ_i).
    seed: DARE's masks for module m are `torch.rand((n, out, fan_in), dtype=float64,
        generator=torch.Generator().manual_seed(zlib.crc32(f"{seed}:{m}".encode()))) < density`.
    allow_missing: a module absent from some sources counts as ΔW = 0 there (otherwise an error).
    ignore_base_model: combine even when the configs name different base models.
    names: how errors refer to the sources (default "adapter 0", "adapter 1", ...).
    """
    weights = _check_options(len(sources), weights, method, density, svd_rank, majority_sign_method)
    names = list(names) if names is not None else [f"adapter {i}" for i in range(len(sources))]
    if len(names) != len(sources):
        raise ConfigError(f"got {len(names)} names for {len(sources)} adapters")
    read = [_modules(cfg, tensors, name) for (cfg, tensors), name in zip(sources, names, strict=True)]
    tables, biases = [t for t, _ in read], [b for _, b in read]
    _check_base_models([cfg for cfg, _ in sources], names, ignore_base_model)
    shared = {key: getattr(sources[0][0], key) for key in _SHARED}
    for (cfg, _), name in zip(sources, names, strict=True):
        for key, why in _SHARED.items():
            if getattr(cfg, key) != shared[key]:
                raise AdapterError(f"{name}: {key}={getattr(cfg, key)}, {names[0]}'s is {shared[key]}: {why}")
    modules = _check_modules(tables, names, allow_missing)
    dtypes = {t.dtype for table in tables for lora in table.values() for t in (lora.A, lora.B)}
    dtypes |= {b.dtype for found in biases for b in found.values()}
    dtype = dtypes.pop()
    for d in dtypes:
        dtype = torch.promote_types(dtype, d)
    out: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for m in modules:
        parts = [(name, w, table.get(m)) for name, w, table in zip(names, weights, tables, strict=True)]
        like = next(p for _, _, p in parts if p is not None)
        A, B = combine_module(method, m, parts, density, svd_rank, majority_sign_method, seed)
        a_key, b_key = (
            ("lora_embedding_A", "lora_embedding_B") if like.embedding else ("lora_A.weight", "lora_B.weight")
        )
        out[f"{PREFIX}{m}.{a_key}"] = A.to(dtype).contiguous()
        out[f"{PREFIX}{m}.{b_key}"] = B.to(dtype).contiguous()
        ranks[m] = A.shape[0]
    if shared["ensure_weight_tying"]:  # each method made the head anew: make it the embedding's transpose again
        retie(out, {h: e for _, tensors in sources for h, e in tied_heads(tensors).items()})
    if any(biases):
        out.update(_combine_biases(tables, biases, weights, names, modules, dtype))
    same_modules = all(len(table) == len(modules) for table in tables)
    carried = _carry_saved(sources, weights, names)
    for m, found in carried.items():
        out.update({f"{PREFIX}{m}.{k}": t.contiguous() for k, t in found.items()})
    rows, token_ids = _carry_tokens(sources, weights, names)
    out.update({f"{PREFIX}{m}.{TOKEN_KEY}": t.contiguous() for m, t in rows.items()})
    config = _output_config([cfg for cfg, _ in sources], ranks, same_modules)
    return config.replace(
        modules_to_save=sorted(carried) if carried else None,
        trainable_token_indices=token_ids,
        lora_bias=any(biases),
        **shared,
    ), out


def _combine_biases(
    tables: list[dict[str, Lora]],
    biases: list[dict[str, torch.Tensor]],
    weights: list[float],
    names: list[str],
    modules: list[str],
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """b = Σ w_i s_i b_i per module (scaling 1 in the result), zero where no source has a bias; file keys."""
    with_bias = next(name for name, found in zip(names, biases, strict=True) if found)
    out = {}
    for m in modules:
        like = next(table[m] for table in tables if m in table)
        if like.embedding:
            raise AdapterError(
                f"{m}: an embedding LoRA cannot be combined with {with_bias}, which has a bias on B (lora_bias): "
                "lora_bias does not work with Embedding layers (as in PEFT)"
            )
        b = torch.zeros(like.shape[0], dtype=torch.float64)
        for table, found, w in zip(tables, biases, weights, strict=True):
            if m in found:
                b += w * table[m].scaling * found[m].double()
        out[f"{PREFIX}{m}.lora_B.bias"] = b.to(dtype).contiguous()
    return out


def _carry_tokens(
    sources: Sequence[Source], weights: list[float], names: list[str]
) -> tuple[dict[str, torch.Tensor], list[int] | dict[str, list[int]] | None]:
    """The token rows (trainable_token_indices) the result carries, each module's from the one source that has
    rows there, and the config value that names them."""
    owner: dict[str, str] = {}
    rows: dict[str, torch.Tensor] = {}
    ids: dict[str, list[int]] = {}
    value = None
    for (cfg, tensors), w, name in zip(sources, weights, names, strict=True):
        for m, t in token_tensors(tensors).items():
            if m in owner:
                raise AdapterError(
                    f"{name}: trains token rows of {m!r} (trainable_token_indices), and so does {owner[m]}; two "
                    "sets of trained rows of one embedding cannot be combined"
                )
            if w != 1.0:
                raise AdapterError(
                    f"{name}: trains token rows of {m!r} (trainable_token_indices), which are carried unchanged "
                    f"and cannot be weighted; give this adapter weight 1, not {w:g}"
                )
            spec = cfg.trainable_token_indices
            mine = (
                spec if isinstance(spec, list) else next(v for k, v in (spec or {}).items() if m.endswith(k))
            )
            owner[m], rows[m], ids[m] = name, t, list(mine)
            value = list(mine) if isinstance(spec, list) else None
    if not rows:
        return rows, None
    return rows, value if value is not None and len(rows) == 1 else ids


def _carry_saved(
    sources: Sequence[Source], weights: list[float], names: list[str]
) -> dict[str, dict[str, torch.Tensor]]:
    """The modules saved whole that the result carries: each from the one source that saves it."""
    owner: dict[str, str] = {}
    out: dict[str, dict[str, torch.Tensor]] = {}
    for (cfg, tensors), w, name in zip(sources, weights, names, strict=True):
        for m, found in saved_tensors(cfg, tensors).items():
            if m in owner:
                raise AdapterError(
                    f"{name}: saves {m!r} whole (modules_to_save), and so does {owner[m]}; two trained copies of "
                    "one module cannot be combined (combine adapters that save it in at most one)"
                )
            if w != 1.0:
                raise AdapterError(
                    f"{name}: saves {m!r} whole (modules_to_save), which is carried unchanged and cannot be "
                    f"weighted; give this adapter weight 1, not {w:g}"
                )
            owner[m], out[m] = name, found
    return out


# -- checks -------------------------------------------------------------------------------------------------------
def _check_options(
    n: int,
    weights: Sequence[float] | None,
    method: str,
    density: float | None,
    svd_rank: int | None,
    sign: str,
) -> list[float]:
    """Validate the arguments that need no file; return the weights (default 1 each)."""
    if method not in METHODS:
        raise ConfigError(f"unknown combine method {method!r}; choose one of {', '.join(METHODS)}")
    if n == 0:
        raise ConfigError("no adapters to combine")
    weights = [1.0] * n if weights is None else list(weights)
    if len(weights) != n:
        raise ConfigError(f"got {len(weights)} weights for {n} adapters; give one weight per adapter")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ConfigError(f"weights must be finite numbers, got {w!r}")
    if method in DENSITY_METHODS:
        if density is None:
            raise ConfigError(
                f"method {method!r} needs a density in (0, 1] (the fraction of ΔW entries kept)"
            )
        if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0 < density <= 1:
            raise ConfigError(f"density must be in (0, 1], got {density!r}")
    elif density is not None:
        raise ConfigError(f"density applies to {', '.join(DENSITY_METHODS)}, not to {method!r}")
    if svd_rank is not None:
        if method not in SVD_METHODS:
            raise ConfigError(f"svd_rank applies to {', '.join(SVD_METHODS)}, not to {method!r}")
        if isinstance(svd_rank, bool) or not isinstance(svd_rank, numbers.Integral) or svd_rank < 1:
            raise ConfigError(f"svd_rank must be a positive integer, got {svd_rank!r}")
    if sign not in SIGN_METHODS:
        raise ConfigError(f"majority_sign_method must be one of {SIGN_METHODS}, got {sign!r}")
    return [float(w) for w in weights]


def _modules(
    config: LoraConfig, tensors: dict[str, torch.Tensor], name: str
) -> tuple[dict[str, Lora], dict[str, torch.Tensor]]:
    """(module name -> its LoRA, checked against the config (which sets each module's r and scaling); module
    name -> its bias on B, for a lora_bias adapter)."""
    if config.use_dora:
        raise AdapterError(f"{name}: DoRA adapters cannot be combined (their update is not s·B·A)")
    if config.init in INIT_FACTORS:  # PiSSA, OLoRA: B·A is relative to W0 - s·B0·A0
        raise AdapterError(
            f"{name}: {config.init} adapters are relative to a modified base weight; convert to plain LoRA first "
            "(lorakit.load_adapter, then save_adapter)"
        )
    if config.target_parameters:
        raise AdapterError(
            f"{name}: adapts parameters (target_parameters {config.target_parameters}), which combine does not "
            "support (PEFT's add_weighted_adapter refuses them too)"
        )
    if config.use_kasa:
        raise AdapterError(
            f"{name}: a KaSA adapter (kasa_config) changes W0 by its SVD, which combine, reading adapter files "
            "alone, does not have; merge it into the model instead"
        )
    if config.bias != "none":
        raise AdapterError(
            f"{name}: bias={config.bias!r} adapters carry trained base biases, which cannot be combined"
        )
    found: dict[str, dict[str, tuple[torch.Tensor, bool]]] = {}
    biases: dict[str, torch.Tensor] = {}
    whole = {f"{m}.{k}" for m, part in saved_tensors(config, tensors).items() for k in part}
    for key, t in tensors.items():
        k = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        if k in whole or k.endswith("." + TOKEN_KEY):  # carried by _carry_saved / _carry_tokens
            continue
        if any(part in k for part in TRAINING_ONLY_TENSORS):  # VeLoRA's, MonteCLoRA's training state
            continue
        if config.lora_bias and k.endswith(".lora_B.bias"):
            biases[k[: -len(".lora_B.bias")]] = t
            continue
        for suffix, (param, embedding) in _KEYS.items():
            if k.endswith("." + suffix):
                found.setdefault(k[: -len(suffix) - 1], {})[param] = (t, embedding)
                break
        else:
            log.warning("%s: ignoring tensor %s (not a LoRA A or B weight)", name, key)
    if not found:
        raise AdapterError(f"{name}: no LoRA tensors (lora_A / lora_B) in the adapter")
    table = {}
    for m, parts in sorted(found.items()):
        if len(parts) != 2:
            have = next(iter(parts))
            raise AdapterError(f"{name}: {m} has lora_{have} but no lora_{'B' if have == 'A' else 'A'}")
        (A, emb_a), (B, emb_b) = parts["A"], parts["B"]
        if config.use_bdlora:  # the stored blocks as the dense factor they stand for: the result is plain LoRA
            A, B = BdLoraVariant.create(config, m).dense(A, B)
        if (
            emb_a != emb_b
            or A.dim() < 2
            or B.dim() != A.dim()
            or B.shape[1] != A.shape[0]
            or any(s != 1 for s in B.shape[2:])
        ):
            raise AdapterError(
                f"{name}: {m} has inconsistent LoRA tensors A {tuple(A.shape)} and B {tuple(B.shape)}"
            )
        if A.shape[0] != config.rank_for(m):
            raise AdapterError(
                f"{name}: {m} has rank {A.shape[0]} in its tensors but r={config.rank_for(m)} in {CONFIG_NAME}"
            )
        table[m] = Lora(A, B, config.scaling_for(m), emb_a)
    for m, b in biases.items():
        lora = table.get(m)
        if lora is None or b.shape != (lora.shape[0],):
            have = f"shape {tuple(b.shape)}" if lora is not None else "no lora_A / lora_B beside it"
            raise AdapterError(f"{name}: {m}.lora_B.bias has {have}; expected one value per output feature")
    if config.lora_bias and set(biases) != set(table):
        m = sorted(set(table) - set(biases))[0]
        raise AdapterError(f"{name}: {m} has no lora_B.bias although {CONFIG_NAME} sets lora_bias")
    return table, biases


def _check_base_models(configs: list[LoraConfig], names: list[str], ignore: bool) -> None:
    first = configs[0].base_model
    for cfg, name in zip(configs, names, strict=True):
        if ignore or cfg.base_model is None:
            continue
        if first is None:
            first = cfg.base_model
        elif cfg.base_model.rstrip("/") != first.rstrip("/"):
            raise AdapterError(
                f"{name}: made for base model {cfg.base_model!r}, another adapter for {first!r}; "
                "pass ignore_base_model=True (--ignore-base-model) if they are the same model"
            )


def _check_modules(tables: list[dict[str, Lora]], names: list[str], allow_missing: bool) -> list[str]:
    """The modules to combine (sorted); every source's LoRA on a module must have the same ΔW shape."""
    modules = sorted(set().union(*tables))
    for m in modules:
        present = [(name, table[m]) for name, table in zip(names, tables, strict=True) if m in table]
        if len(present) < len(tables) and not allow_missing:
            lacking = next(name for name, table in zip(names, tables, strict=True) if m not in table)
            raise AdapterError(
                f"{lacking}: has no LoRA on {m}, which {present[0][0]} adapts; the adapters target different "
                "modules (pass allow_missing=True / --allow-missing to count a missing module as ΔW = 0)"
            )
        name0, first = present[0]
        for name, lora in present[1:]:
            if lora.shape != first.shape or lora.embedding != first.embedding:
                raise AdapterError(
                    f"{m}: ΔW is {_kind(first)} {first.shape} in {name0} but {_kind(lora)} {lora.shape} in "
                    f"{name}; are the adapters for the same base model?"
                )
    return modules


def _kind(lora: Lora) -> str:
    return "an embedding" if lora.embedding else "a weight"


# -- output config ------------------------------------------------------------------------------------------------
def _output_config(configs: list[LoraConfig], ranks: dict[str, int], same_modules: bool) -> LoraConfig:
    """Scaling 1 everywhere: alpha = r, with a rank_pattern/alpha_pattern entry per module off the default r."""
    first = configs[0]
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(m): rm for m, rm in ranks.items() if rm != r}
    targeting = ("targets", "exclude", "layers", "layers_pattern")
    if same_modules and all(getattr(c, f) == getattr(first, f) for c in configs for f in targeting):
        where = {f: getattr(first, f) for f in targeting}
    else:  # the exact module set, as one full-match regex
        where = {"targets": "(" + "|".join(re.escape(m) for m in ranks) + ")", "exclude": None}
        where |= {"layers": None, "layers_pattern": None}
    base = next((c.base_model for c in configs if c.base_model is not None), None)
    return LoraConfig(
        r=r,
        alpha=r,
        dropout=first.dropout,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        use_rslora=False,
        init="default",
        task_type=first.task_type,
        base_model=base,
        **where,
    )
