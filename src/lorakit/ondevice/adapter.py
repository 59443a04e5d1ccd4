"""LoRA adapters as llama.cpp's GGUF adapter files, both ways.

The layout, as llama.cpp's own `convert_lora_to_gguf.py` writes it and `llama-adapter.cpp` reads it:
- keys `general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha` (f32, one for the file) and
  `general.architecture` (the base's, e.g. "llama");
- per adapted weight `<gguf name>.lora_a` (r, in) and `.lora_b` (out, r): PEFT's A and B. The token embedding's
  A is stored transposed, (vocab, r);
- llama.cpp scales each pair by alpha / r with r read from B's shape. So rsLoRA, `alpha_pattern`, `rank_pattern`
  and DyLoRA's α/b are folded into B: one alpha is written, and B is rescaled per layer so that every layer's
  scale is exact;
- the Llama family's q/k rows are interleaved for RoPE in GGUF (`names.permute_rows`), and so is B of q_proj and
  k_proj.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import AdapterError, AdapterFileError
from lorakit.formats import PREFIX
from lorakit.lora_format import plan_lora_tensors
from lorakit.ondevice.names import ExportError, NameMap, permute_rows, unpermute_rows
from lorakit.ondevice.writer import GgufFile, check_outtype, decode, open_gguf, read_field
from lorakit.registry import adapter_layers, registry

K = gguf.Keys
V = gguf.GGUFValueType
CAUSAL = (None, "CAUSAL_LM")


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------


def adapter_gguf(model: nn.Module, name: str = "default", outtype: str = "f32") -> GgufFile:
    """Adapter `name` on `model` as llama.cpp's GGUF LoRA file (not yet written). Raises ExportError, naming the
    layer and the reason, for whatever llama.cpp cannot run."""
    check_outtype(outtype)
    info = registry(model).adapters.get(name)
    if info is None:
        raise AdapterError(
            f"no adapter {name!r} on {type(model).__name__}; adapters: {list(registry(model).adapters)}"
        )
    _check_adapter(info.config, name)
    if any(
        getattr(layer.adapters[name], "base_residual", None) is not None
        for _, layer in adapter_layers(model, name)
    ):
        raise ExportError(
            f"adapter {name!r} moved a part of the base weight into itself (init {info.config.init!r}), and llama.cpp "
            "applies adapters to the original base: save it and load it again (loaded, it is plain LoRA on the "
            "original base), or export --merged"
        )
    names = NameMap(model.config)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    alpha = float(info.config.alpha) or float(info.config.r)
    out = GgufFile(names.arch.gguf)
    out.add(K.General.TYPE, gguf.GGUFType.ADAPTER, V.STRING)
    out.add(K.General.NAME, name, V.STRING)
    out.add(K.Adapter.TYPE, "lora", V.STRING)
    out.add(K.Adapter.LORA_ALPHA, alpha, V.FLOAT32)
    for module, layer in adapter_layers(model, name):
        base, a, b = _pair(model, names, tied, module, layer, name, alpha)
        out.add_tensor(base + ".lora_a", a, outtype)
        out.add_tensor(base + ".lora_b", b, outtype)
    return out


def save_adapter_gguf(
    model: nn.Module,
    path: str | os.PathLike,
    name: str = "default",
    outtype: str = "f32",
    *,
    progress: bool = False,
) -> Path:
    """Write adapter `name` of `model` to `path` as a llama.cpp GGUF LoRA file, atomically."""
    return adapter_gguf(model, name, outtype).write(path, progress=progress)


def _check_adapter(config: LoraConfig, name: str) -> None:
    if config.bias != "none":
        raise ExportError(
            f"adapter {name!r} trains biases (bias={config.bias!r}), which llama.cpp's LoRA files cannot hold; "
            "export --merged instead"
        )
    if config.task_type not in CAUSAL:
        raise ExportError(
            f"adapter {name!r} is a {config.task_type} adapter; llama.cpp runs causal language models only"
        )
    if config.target_parameters:
        raise ExportError(
            f"adapter {name!r} adapts parameters (target_parameters), which llama.cpp's LoRA files cannot hold; "
            "export --merged instead"
        )
    if config.modules_to_save:
        raise ExportError(
            f"adapter {name!r} saves {', '.join(config.modules_to_save)} whole (modules_to_save), which llama.cpp's "
            "LoRA files cannot hold; export --merged instead"
        )


def _pair(
    model: nn.Module, names: NameMap, tied: bool, module: str, layer: Any, name: str, alpha: float
) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(GGUF name of the base tensor, lora_a, lora_b) of one layer as llama.cpp stores them, with the layer's
    scale folded into B."""
    adapter = layer.adapters[name]
    variant = adapter.variant
    if not variant.plain:
        raise ExportError(
            f"{module}: a {variant.label} adapter has no plain LoRA form that llama.cpp runs "
            f"({variant.not_plain_because}); export --merged instead"
        )
    if not (layer.handler.linear or layer.handler.embedding):
        raise ExportError(
            f"{module}: a LoRA on a {type(layer.base_layer).__name__} has no llama.cpp form (linear and embedding layers "
            "only); export --merged instead"
        )
    gname = names.tensor(module + ".weight")
    if gname is None:
        raise ExportError(f"{module}: llama.cpp's {names.arch.gguf} model has no tensor for this module")
    embedding = layer.handler.embedding
    if tied and (gname == "output.weight" or embedding):
        what = "the output head" if gname == "output.weight" else "the token embedding"
        raise ExportError(
            f"{module}: an adapter on {what} of a base that ties the embedding to the output head "
            f"({type(model).__name__} does) cannot be expressed in llama.cpp, which shares one tensor for both; "
            "export --merged instead"
        )
    A, B, s = variant.factors(adapter)
    A, B = A.detach().float().flatten(1), B.detach().float().flatten(1)
    B = B * (s * A.shape[0] / alpha)  # llama.cpp multiplies by alpha / r
    heads = names.heads(module + ".weight")
    if heads is not None:
        B = permute_rows(B, heads)
    return gname, (A.T.contiguous() if embedding else A), B


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


@dataclass
class GgufAdapter:
    """A GGUF LoRA file as read: its architecture, alpha, and (lora_a, lora_b) per base tensor, as stored."""

    path: Path
    arch: str
    alpha: float
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    types: dict[str, str]


def read_adapter_gguf(path: str | os.PathLike) -> GgufAdapter:
    """Read and check a llama.cpp GGUF LoRA file. AdapterFileError names the file and what is wrong."""
    path = Path(path)
    reader = open_gguf(path)
    gtype = read_field(reader, K.General.TYPE)
    if gtype != gguf.GGUFType.ADAPTER or read_field(reader, K.Adapter.TYPE) != "lora":
        raise AdapterFileError(
            f"{path}: not a GGUF LoRA adapter (general.type {gtype!r}); a GGUF model is a base: pass it as --model"
        )
    halves: dict[str, dict[str, torch.Tensor]] = {}
    types: dict[str, str] = {}
    for t in reader.tensors:
        m = re.fullmatch(r"(.+)\.lora_([ab])", t.name)
        if m is None:
            raise AdapterFileError(f"{path}: tensor {t.name} is neither a .lora_a nor a .lora_b")
        x = decode(t)
        if not bool(torch.isfinite(x).all()):
            raise AdapterFileError(f"{path}: {t.name} has non-finite values (nan or inf)")
        halves.setdefault(m[1], {})[m[2]] = x
        types[t.name] = t.tensor_type.name
    pairs = {}
    for base, ab in halves.items():
        if set(ab) != {"a", "b"}:
            missing = ".lora_b" if "a" in ab else ".lora_a"
            raise AdapterFileError(f"{path}: {base} has no {missing} tensor")
        pairs[base] = (ab["a"], ab["b"])
    alpha = float(read_field(reader, K.Adapter.LORA_ALPHA, 0.0))
    return GgufAdapter(path, str(read_field(reader, K.General.ARCHITECTURE)), alpha, pairs, types)


def lora_from_gguf(model: nn.Module, ga: GgufAdapter) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The LoraConfig and PEFT-keyed tensors that compute on `model` what llama.cpp computes with the file."""
    names = NameMap(model.config)
    if ga.arch != names.arch.gguf:
        raise AdapterError(
            f"{ga.path}: written for llama.cpp's {ga.arch!r} models, the model is {names.arch.gguf!r}"
        )
    modules: dict[str, tuple[str, bool]] = {}  # gguf name -> (module, is an embedding)
    for mname, mod in model.named_modules():
        g = names.tensor(mname + ".weight") if mname and not mname.endswith(".base_layer") else None
        if g is not None:
            base = getattr(mod, "base_layer", mod)
            modules.setdefault(g, (mname, isinstance(base, nn.Embedding)))
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for gname, (a, b) in sorted(ga.pairs.items()):
        if gname not in modules:
            raise AdapterError(f"{ga.path}: {gname} has no module in {type(model).__name__}")
        module, embedding = modules[gname]
        a = a.T.contiguous() if embedding else a
        heads = names.heads(module + ".weight")
        b = unpermute_rows(b, heads) if heads is not None else b
        if a.shape[0] != b.shape[1]:
            raise AdapterError(f"{ga.path}: {gname}: lora_a has rank {a.shape[0]}, lora_b {b.shape[1]}")
        ranks[module] = a.shape[0]
        key = "lora_embedding_{}" if embedding else "lora_{}.weight"
        tensors[f"{PREFIX}{module}.{key.format('A')}"] = a
        tensors[f"{PREFIX}{module}.{key.format('B')}"] = b
    if not ranks:
        raise AdapterFileError(f"{ga.path}: holds no LoRA tensors")
    r = Counter(ranks.values()).most_common(1)[0][0]
    rank_pattern = {re.escape(m): k for m, k in ranks.items() if k != r}
    if ga.alpha:
        alpha, alpha_pattern = ga.alpha, {}
    else:  # alpha 0: llama.cpp scales by 1, which is alpha = r in every layer
        alpha, alpha_pattern = float(r), {re.escape(m): float(k) for m, k in ranks.items() if k != r}
    config = LoraConfig(
        r=r,
        alpha=alpha,
        targets=sorted(ranks),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        task_type="CAUSAL_LM",
    )
    return config, tensors


def _plan(model: nn.Module, path: Path, raw: dict[str, Any], name: str, allow_pickle: bool):
    ga = read_adapter_gguf(path)
    config, tensors = lora_from_gguf(model, ga)
    return plan_lora_tensors(model, config, tensors, path, name)


def describe_gguf(path: Path, raw: dict[str, Any] | None = None) -> dict[str, Any]:
    """What `lorakit inspect` shows of a GGUF LoRA file: its keys, and per tensor its rank, shape and type."""
    ga = read_adapter_gguf(path)
    rows = {}
    for base, (a, b) in sorted(ga.pairs.items()):
        embedding = base.startswith("token_embd")
        r = a.shape[1] if embedding else a.shape[0]
        rows[base] = {
            "r": r,
            "lora_a": tuple(a.shape),
            "lora_b": tuple(b.shape),
            "type": ga.types[base + ".lora_a"],
            "scale": ga.alpha / r if ga.alpha else 1.0,
        }
    return {
        "format": "GGUF LoRA (llama.cpp)",
        "architecture": ga.arch,
        "alpha": ga.alpha,
        "modules": rows,
        "tensors": 2 * len(rows),
        "parameters": sum(a.numel() + b.numel() for a, b in ga.pairs.values()),
    }
