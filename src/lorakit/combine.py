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
module is `lorakit.combine_math`; reading and checking each source is `lorakit.combine_sources`; this module
checks the options, combines module by module and writes the result.
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
from lorakit.combine_sources import (
    Source,
    carry_saved,
    carry_tokens,
    check_base_models,
    check_modules,
    module_table,
    shared_settings,
)
from lorakit.config import LoraConfig
from lorakit.errors import AdapterError, AdapterFileError, ConfigError
from lorakit.formats import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from lorakit.lora_format import TOKEN_KEY, read_adapter
from lorakit.tying import retie, tied_heads

log = logging.getLogger(__name__)

METHODS = ("cat", "linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd", *DENSITY_METHODS)
SIGN_METHODS = ("total", "frequency")
RECORD_NAME = "combine.json"


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
    read = [module_table(cfg, tensors, name) for (cfg, tensors), name in zip(sources, names, strict=True)]
    tables, biases = [t for t, _ in read], [b for _, b in read]
    check_base_models([cfg for cfg, _ in sources], names, ignore_base_model)
    shared = shared_settings([cfg for cfg, _ in sources], names)
    modules = check_modules(tables, names, allow_missing)
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
    carried = carry_saved(sources, weights, names)
    for m, found in carried.items():
        out.update({f"{PREFIX}{m}.{k}": t.contiguous() for k, t in found.items()})
    rows, token_ids = carry_tokens(sources, weights, names)
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


# -- options ------------------------------------------------------------------------------------------------------
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
