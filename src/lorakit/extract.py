"""Extract a LoRA adapter from a fine-tuned model: the difference to its base, weight by weight, truncated by SVD.

    done = extract("base-folder", "tuned-folder", "adapter-folder", r=32)   # lorakit extract
    lorakit.load_adapter(model, "adapter-folder")                            # or PEFT's PeftModel.from_pretrained

For each weight that differs, ΔW = W_tuned − W_base (seen as out × fan_in, `lorakit.handlers`) is factored as
U·S·Vᵀ and kept to its top k singular values: B = U_k·√S_k, A = √S_k·V_kᵀ, written with scaling 1 (alpha = rank,
a rank_pattern/alpha_pattern entry for every module off the most common rank). k is `r`, or fewer:
- the numerical rank: singular values below `RTOL` of the largest are dropped (a ΔW that is itself a rank-8 LoRA
  comes out at rank 8);
- with `energy`, the fewest that keep that fraction of ‖ΔW‖²_F.
What each module loses is reported: ‖ΔW − B·A‖_F / ‖ΔW‖_F, from the dropped singular values. With `niter`, a
seeded randomised SVD computes only the top r + 10 triplets, for large models. The arithmetic is
`lorakit.extract_math`; reading both models and finding what changed is `lorakit.extract_plan`.

What else changed is carried as PEFT carries it, so that base + adapter is the tuned model wherever it can be:
- a changed bias of a module that gets a LoRA: `bias="lora_only"` (every such module's bias, from the tuned model);
  any other changed bias: `bias="all"` (every bias of the model). With `lora_bias`, the biases' changes go into
  the LoRAs' own biases on B instead (PEFT's `lora_bias`): loading the adapter then leaves the base's biases as
  they are, so it can share a base with other adapters (a collection, mixed batches);
- a changed module whose parameters are all vectors (a norm): a whole copy (`modules_to_save`), when `copy_small`;
- weights shared by several modules (tied input and output embeddings): a LoRA on each of them, of one ΔW; the
  head's the embedding's transposed, so the file says ensure_weight_tying and a merge keeps the model tied.
Every changed weight gets a LoRA by default (`targets=None`), embeddings and the output head included. With
`targets` (PEFT's rules: a list of names, a regex, or "all-linear"), changed modules outside them are left out,
and the result names them with their relative change ‖ΔW‖_F / ‖W‖_F.

Both models are Hugging Face folders (a .gguf file is converted once, as for `load_model`) in safetensors, of one
architecture; they are read one tensor at a time (`lorakit.readers.ModelTensors`), never whole, so extraction
needs about one weight's memory (plus its SVD, and the adapter it writes), not a model's. Any mismatch (an architecture, a tensor's shape, a tensor missing from one of
them) fails in one line naming it, before anything is written; the output folder is written atomically.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from lorakit.atomic import atomic_dir
from lorakit.checks import is_int, is_number
from lorakit.config import LoraConfig
from lorakit.errors import AdapterError, ConfigError
from lorakit.extract_math import flips, rank_of, svd, svd_once
from lorakit.extract_plan import Plan, compare, model_folder, parameters, read_tensor, same_keys, skeleton_of
from lorakit.formats import CONFIG_NAME, PREFIX, WEIGHTS_NAME, targets_for_file
from lorakit.handlers import handler_for
from lorakit.readers import ModelTensors
from lorakit.tying import tied_heads

log = logging.getLogger(__name__)

RECORD_NAME = "extract.json"


@dataclass(frozen=True)
class ModuleLora:
    module: str
    rank: int
    error: float
    """‖ΔW − B·A‖_F / ‖ΔW‖_F."""


@dataclass(frozen=True)
class Extracted:
    """What `extract` wrote to `path`."""

    path: Path
    loras: list[ModuleLora]
    copies: list[str]
    """Modules saved whole (modules_to_save)."""
    bias: str
    """PEFT's bias mode of the adapter: "none", "lora_only" or "all"."""
    left_out: dict[str, float] = field(default_factory=dict)
    """Changed modules the adapter does not carry -> ‖ΔW‖_F / ‖W‖_F of their largest change."""
    parameters: int = 0
    """Numbers in the adapter file."""
    base_parameters: int = 0
    lora_bias: bool = False
    """Whether the changed biases are carried as the LoRAs' biases on B (PEFT's lora_bias)."""

    @property
    def max_error(self) -> float:
        return max((m.error for m in self.loras), default=0.0)


def extract(
    base: str | os.PathLike | None,
    tuned: str | os.PathLike,
    out: str | os.PathLike,
    *,
    r: int = 16,
    energy: float | None = None,
    targets: str | list[str] | None = None,
    copy_small: bool = True,
    niter: int | None = None,
    lora_bias: bool = False,
    progress: bool = False,
) -> Extracted:
    """Write the adapter that turns `base` (None: the default model) into `tuned` as a PEFT folder `out`.

    `r` is the most rank a module gets; `energy` (in (0, 1]) lowers it per module to what keeps that fraction of
    ‖ΔW‖²_F. `targets`: which changed modules get a LoRA (None: every one LoRA can wrap). `copy_small`: carry
    changed norms whole. `niter`: a randomised SVD with that many power iterations instead of the full one (for
    large models: the top r + 10 triplets only). `lora_bias`: carry changed biases as each LoRA's bias on B
    (b = Δbias), not as the base's bias (`bias="lora_only"`), so that the adapter never changes the base; every
    changed bias must then belong to a module with a LoRA. `progress`: a bar on stderr. See the module
    docstring."""
    _check_options(r, energy, niter, lora_bias)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AdapterError(f"{out}: exists and is not a folder")
    base_dir, tuned_dir = model_folder(base, "base"), model_folder(tuned, "tuned")
    if base_dir.resolve() == tuned_dir.resolve():
        raise ConfigError(
            f"the base and the tuned model are the same folder ({base_dir}): nothing to extract"
        )
    skeleton = skeleton_of(base_dir, tuned_dir)
    old, new = ModelTensors(base_dir), ModelTensors(tuned_dir)
    same_keys(old, new)
    plan = Plan(skeleton, targets)
    for pname, param in _bar(parameters(skeleton), progress, "comparing"):
        compare(plan, pname, param, old, new)
    tensors, loras = _factors(plan, old, new, r, energy, niter, progress)
    copies = _copies(plan, new, copy_small, tensors)
    if not loras:
        raise ConfigError(_nothing_message(plan, copies, base_dir, tuned_dir))
    on_b = lora_bias and bool(plan.biases)
    if on_b:
        _biases_on_b(plan, old, new, loras, tensors)
    bias = "none" if on_b else _biases(plan, new, loras, tensors)
    config = _config(skeleton, {m.module: m.rank for m in loras}, bias, on_b, copies, base_dir)
    if not on_b and tied_heads(tensors):  # a tied weight's one SVD: merging the adapter keeps the model tied
        config = config.replace(ensure_weight_tying=True)
    record = _record(base_dir, tuned_dir, r, energy, niter, loras, copies, bias, on_b, plan.left_out)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config.to_peft_dict(), indent=2, sort_keys=True) + "\n")
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")

    atomic_dir(out, write, keep_others=True)
    _warn(plan, out)
    log.info("extracted %d LoRAs and %d copies into %s", len(loras), len(copies), out)
    numbers = sum(t.numel() for t in tensors.values())
    return Extracted(out, loras, copies, bias, dict(plan.left_out), numbers, plan.numel, on_b)


def _record(base_dir, tuned_dir, r, energy, niter, loras, copies, bias, lora_bias, left_out) -> dict:
    """extract.json: the sources, the options, and what became of each changed module."""
    return {
        "base": str(base_dir),
        "tuned": str(tuned_dir),
        "r": r,
        "energy": energy,
        "svd": "full" if niter is None else f"randomised, niter={niter}",
        "modules": {m.module: {"rank": m.rank, "error": round(m.error, 6)} for m in loras},
        "copies": copies,
        "bias": bias,
        "lora_bias": lora_bias,
        "left_out": {m: round(v, 6) for m, v in left_out.items()},
    }


def _warn(plan: Plan, out: Path) -> None:
    if plan.dtypes:
        log.warning(
            "the base holds %s and the tuned model %s: differences of rounding count as changes", *plan.dtypes
        )
    if plan.left_out:
        worst = max(plan.left_out, key=plan.left_out.__getitem__)
        log.warning(
            "%d changed modules are not in the adapter (the most changed: %s, ‖ΔW‖/‖W‖ = %.3g); %s lists them",
            len(plan.left_out),
            worst,
            plan.left_out[worst],
            out / RECORD_NAME,
        )


# -- inputs ---------------------------------------------------------------------------------------------------


def _check_options(r: int, energy: float | None, niter: int | None, lora_bias: bool) -> None:
    if not isinstance(lora_bias, bool):
        raise ConfigError(f"lora_bias must be true or false, got {lora_bias!r}")
    if not is_int(r, 1):
        raise ConfigError(f"r must be a whole number of at least 1, got {r!r}")
    if energy is not None and not (is_number(energy) and 0 < energy <= 1):
        raise ConfigError(f"energy must be a fraction in (0, 1], got {energy!r}")
    if niter is not None and not is_int(niter, 0):
        raise ConfigError(f"niter must be a whole number of at least 0, got {niter!r}")


def _bar(items, progress: bool, desc: str):
    return tqdm(items, desc=desc, unit="tensor", disable=not progress, leave=False)


# -- the adapter's tensors ------------------------------------------------------------------------------------


@torch.no_grad()
def _factors(
    plan: Plan,
    old: ModelTensors,
    new: ModelTensors,
    r: int,
    energy: float | None,
    niter: int | None,
    progress: bool,
) -> tuple[dict[str, torch.Tensor], list[ModuleLora]]:
    tensors: dict[str, torch.Tensor] = {}
    loras = []
    shared: dict[str, tuple] = {}  # a tied parameter's SVD, for its other modules
    sharers = Counter(plan.loras.values())
    for module, pname in _bar(list(plan.loras.items()), progress, "SVD"):
        w_old, w_new = read_tensor(plan, old, pname), read_tensor(plan, new, pname)
        base = plan.modules[module]
        h = handler_for(base)
        delta = h.to_2d(w_new.float() - w_old.float()).reshape(h.dims(base))
        if sharers[pname] > 1:
            u, s, vh, total = svd_once(shared, pname, flips(h), delta, r, niter)
        else:
            u, s, vh, total = svd(delta, r, niter)
        k = rank_of(s, r, energy, total)
        root = s[:k].sqrt()
        shape_a, shape_b = h.shapes(base, k)
        a = (root[:, None] * vh[:k]).reshape(shape_a).to(w_new.dtype).contiguous()
        b = (u[:, :k] * root).reshape(shape_b).to(w_new.dtype).contiguous()
        names = (
            ("lora_embedding_A", "lora_embedding_B") if h.embedding else ("lora_A.weight", "lora_B.weight")
        )
        tensors[f"{PREFIX}{module}.{names[0]}"] = a
        tensors[f"{PREFIX}{module}.{names[1]}"] = b
        if niter is None:  # every singular value is known: the error from the dropped ones, exactly
            lost = s[k:].double().square().sum().item()
        else:  # the top ones only: what they leave of ‖ΔW‖² (float32 rounding floors it at ~3e-4)
            lost = max(total - s[:k].double().square().sum().item(), 0.0)
        loras.append(ModuleLora(module, k, math.sqrt(lost / total)))
    return tensors, loras


def _copies(plan: Plan, new: ModelTensors, copy_small: bool, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Modules with other changed parameters: copied whole when they hold vectors only (norms) and `copy_small`;
    else left out."""
    copies = []
    for module, change in plan.other.items():
        params = dict(plan.modules[module].named_parameters())
        if copy_small and all(p.dim() <= 1 for p in params.values()):
            for leaf in params:
                pname = f"{module}.{leaf}" if module else leaf
                tensors[f"{PREFIX}{pname}"] = read_tensor(plan, new, pname).contiguous()
            copies.append(module)
        else:
            plan.left_out[module] = change
    return copies


def _biases(plan: Plan, new: ModelTensors, loras: list[ModuleLora], tensors: dict[str, torch.Tensor]) -> str:
    """PEFT's bias mode that carries every changed bias of a LoRA-able module, and the bias tensors it saves:
    "lora_only" (the biases of the modules with a LoRA) when that is enough, else "all" (every bias)."""
    if not plan.biases:
        return "none"
    with_lora = {m.module for m in loras}
    mode = "lora_only" if all(m in with_lora for m in plan.biases) else "all"
    for module, m in plan.modules.items():
        if not isinstance(getattr(m, "bias", None), nn.Parameter):
            continue
        if module in with_lora:
            where = f"{module}.base_layer.bias"
        elif mode == "all":
            where = f"{module}.bias"
        else:
            continue
        tensors[f"{PREFIX}{where}"] = read_tensor(plan, new, f"{module}.bias").contiguous()
    return mode


def _biases_on_b(
    plan: Plan,
    old: ModelTensors,
    new: ModelTensors,
    loras: list[ModuleLora],
    tensors: dict[str, torch.Tensor],
) -> None:
    """lora_bias: each LoRA's bias on B is its module's Δbias (zero where the bias did not change or there is
    none: PEFT's lora_bias gives every LoRA one)."""
    with_lora = {m.module for m in loras}
    alone = [m for m in plan.biases if m not in with_lora]
    if alone:
        raise ConfigError(
            f"lora_bias: the bias of {alone[0]} changed but its weight gets no LoRA to carry it; extract without "
            "lora_bias (the bias is then saved whole, bias='all')"
        )
    for m in loras:
        a_key = f"{PREFIX}{m.module}.lora_A.weight"
        if a_key not in tensors:  # lora_embedding_A: an embedding has no bias on B
            raise ConfigError(
                f"lora_bias does not work with the embedding LoRA on {m.module} (as in PEFT); leave it out with "
                "targets (e.g. all-linear), or extract without lora_bias"
            )
        like = tensors[a_key]
        if m.module in plan.biases:
            bias = f"{m.module}.bias"
            delta = read_tensor(plan, new, bias).float() - read_tensor(plan, old, bias).float()
        else:
            delta = torch.zeros(tensors[f"{PREFIX}{m.module}.lora_B.weight"].shape[0])
        tensors[f"{PREFIX}{m.module}.lora_B.bias"] = delta.to(like.dtype).contiguous()


def _config(
    skeleton: nn.Module, ranks: dict[str, int], bias: str, lora_bias: bool, copies: list[str], base_dir: Path
) -> LoraConfig:
    """Scaling 1 everywhere: alpha = r, with a rank_pattern/alpha_pattern entry per module off the default r."""
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    pattern = {re.escape(m): k for m, k in ranks.items() if k != r}
    config = LoraConfig(
        r=r,
        alpha=r,
        rank_pattern=pattern,
        alpha_pattern={m: float(k) for m, k in pattern.items()},
        bias=bias,
        lora_bias=lora_bias,
        modules_to_save=list(copies) or None,
        task_type="CAUSAL_LM",
        base_model=str(base_dir),
    )
    modules = sorted(ranks, key=list(dict(skeleton.named_modules())).index)
    return config.replace(targets=targets_for_file(skeleton, config, modules) if modules else [])


def _nothing_message(plan: Plan, copies: list[str], base_dir: Path, tuned_dir: Path) -> str:
    changed = sorted({*plan.left_out, *copies, *plan.biases})
    if not changed:
        return f"{tuned_dir} has the same weights as {base_dir}: nothing to extract"
    names = ", ".join(changed[:4]) + (" …" if len(changed) > 4 else "")
    if plan.left_out and plan.allowed is not None:
        return f"no changed weight is in the targets (changed: {names}): nothing to write"
    return f"no weight matrix changed, only vectors ({names}): a LoRA adapter needs one to adapt"
