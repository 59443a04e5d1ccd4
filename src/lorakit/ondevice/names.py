"""Hugging Face names and layouts against llama.cpp's GGUF ones, for the architectures lorakit exports.

A module `model.layers.3.self_attn.q_proj` is the GGUF tensor `blk.3.attn_q.weight` (the `gguf` package's own
name map). llama.cpp's converter stores the Llama family's q and k weights with the rows of each head
interleaved for its RoPE (`permute_rows`); transformers undoes that when it reads a GGUF file, so every weight,
and every LoRA B, that goes the other way is permuted the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gguf
import torch

from lorakit.errors import ConfigError


class ExportError(ConfigError):
    """Something cannot be written as (or read from) a GGUF file for llama.cpp; the message says what instead."""


@dataclass(frozen=True)
class Arch:
    """How one Hugging Face `model_type` is written for llama.cpp."""

    gguf: str
    """general.architecture, the name llama.cpp knows (Mistral is written as "llama", as llama.cpp does)."""
    permute_qk: bool
    """Whether llama.cpp's converter interleaves q/k rows for RoPE (the Llama family)."""


ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", True),
    "mistral": Arch("llama", True),
    "qwen2": Arch("qwen2", False),
    "qwen3": Arch("qwen3", False),
}


def arch_of(config: Any) -> Arch:
    """The Arch of a transformers config, or ExportError naming the model type."""
    model_type = getattr(config, "model_type", None)
    arch = ARCHS.get(str(model_type))
    if arch is None:
        raise ExportError(
            f"model type {model_type!r} has no GGUF export in lorakit (it writes {', '.join(sorted(ARCHS))}); "
            "merge the adapter (lorakit merge) and convert the folder with llama.cpp's convert_hf_to_gguf.py"
        )
    return arch


def gguf_arch(name: str) -> gguf.MODEL_ARCH:
    return next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == name)


class NameMap:
    """Hugging Face parameter names <-> GGUF tensor names for one model, plus the q/k row permutation."""

    def __init__(self, config: Any) -> None:
        self.arch = arch_of(config)
        self.n_head = int(config.num_attention_heads)
        self.n_kv_head = int(getattr(config, "num_key_value_heads", None) or self.n_head)
        self._map = gguf.get_tensor_name_map(gguf_arch(self.arch.gguf), int(config.num_hidden_layers))

    def tensor(self, hf_name: str) -> str | None:
        """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`; None for a name llama.cpp lacks."""
        return self._map.get_name(hf_name, try_suffixes=(".weight", ".bias"))

    def heads(self, hf_name: str) -> int | None:
        """The head count whose rows llama.cpp interleaves in this parameter (q: n_head, k: n_kv_head), or None."""
        if not self.arch.permute_qk:
            return None
        module = hf_name.rsplit(".", 1)[0] if hf_name.endswith((".weight", ".bias")) else hf_name
        if module.endswith("q_proj"):
            return self.n_head
        if module.endswith("k_proj"):
            return self.n_kv_head
        return None


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Interleave each head's rows for llama.cpp's RoPE (what its converter does to q/k weights and biases)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute_rows`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
