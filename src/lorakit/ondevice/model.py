"""Whole models as GGUF files that llama.cpp runs alone: the weights (merged or not), the hyperparameters, the
tokenizer and the chat template.

The key-value entries come from the base's own GGUF file where there is one (the bundled SmolLM2, or any
`--model x.gguf`): its tokenizer, pre-tokenizer and chat template are then exactly the ones llama.cpp had. For a
Hugging Face folder they are built from `config.json` and `tokenizer.json` (byte-level BPE tokenizers: Llama 3,
Qwen 2, SmolLM, ...).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import gguf
from torch import nn

from lorakit.errors import ModelLoadError
from lorakit.ondevice.names import ExportError, NameMap, permute_rows
from lorakit.ondevice.writer import OUTTYPES, Entry, GgufFile, check_outtype, copy_entries, open_gguf

K = gguf.Keys
V = gguf.GGUFValueType
_SKIP = (K.General.FILE_TYPE, K.General.QUANTIZATION_VERSION, K.General.ARCHITECTURE)


def model_gguf(
    model: nn.Module,
    outtype: str = "f32",
    *,
    base_gguf: str | os.PathLike | None = None,
    tokenizer: Any = None,
    name: str | None = None,
) -> GgufFile:
    """`model`'s weights as a complete llama.cpp model file (not yet written). Adapters must be merged or unloaded
    first. Entries come from `base_gguf` if given, else from the model's config and `tokenizer` (its folder)."""
    check_outtype(outtype)
    names = NameMap(model.config)
    out = GgufFile(names.arch.gguf)
    if base_gguf is not None:
        reader = open_gguf(base_gguf, ModelLoadError)
        base_arch = reader.fields[K.General.ARCHITECTURE].contents()
        if base_arch != names.arch.gguf:
            raise ExportError(
                f"{base_gguf}: a {base_arch!r} model, but the model to write is {names.arch.gguf!r}"
            )
        out.entries = copy_entries(reader, skip=_SKIP)
    else:
        out.entries = hparams(model.config, names.arch.gguf) + tokenizer_entries(tokenizer)
    out.add(K.General.TYPE, gguf.GGUFType.MODEL, V.STRING)
    if name:
        out.add(K.General.NAME, name, V.STRING)
    out.add(K.General.FILE_TYPE, int(OUTTYPES[outtype][1]), V.UINT32)
    out.add(K.General.QUANTIZATION_VERSION, gguf.GGML_QUANT_VERSION, V.UINT32)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        gname = names.tensor(hf_name)
        if gname is None:
            raise ExportError(f"{hf_name}: llama.cpp's {names.arch.gguf} model has no tensor for this weight")
        heads = names.heads(hf_name)
        out.add_tensor(
            gname, t, outtype, None if heads is None else functools.partial(permute_rows, n_head=heads)
        )
    return out


def hparams(config: Any, arch: str) -> list[Entry]:
    """The hyperparameter entries llama.cpp reads for a Llama-family or Qwen model, from a transformers config."""
    rope = getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", "linear"):
        raise ExportError(
            f"rope_scaling {rope_type!r} is not written by lorakit's GGUF export; pass the base as a .gguf file "
            "(--model base.gguf), whose entries are copied"
        )
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope_theta = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get(
        "rope_theta", 10000.0
    )
    e = [
        Entry(f"{arch}.context_length", int(config.max_position_embeddings), V.UINT32),
        Entry(f"{arch}.embedding_length", int(config.hidden_size), V.UINT32),
        Entry(f"{arch}.block_count", int(config.num_hidden_layers), V.UINT32),
        Entry(f"{arch}.feed_forward_length", int(config.intermediate_size), V.UINT32),
        Entry(f"{arch}.attention.head_count", int(n_head), V.UINT32),
        Entry(f"{arch}.attention.head_count_kv", int(config.num_key_value_heads or n_head), V.UINT32),
        Entry(f"{arch}.attention.layer_norm_rms_epsilon", float(config.rms_norm_eps), V.FLOAT32),
        Entry(f"{arch}.rope.freq_base", float(rope_theta), V.FLOAT32),
        Entry(f"{arch}.rope.dimension_count", int(head_dim), V.UINT32),
        Entry(f"{arch}.attention.key_length", int(head_dim), V.UINT32),
        Entry(f"{arch}.attention.value_length", int(head_dim), V.UINT32),
        Entry(f"{arch}.vocab_size", int(config.vocab_size), V.UINT32),
    ]
    if rope_type == "linear":
        e += [
            Entry(f"{arch}.rope.scaling.type", "linear", V.STRING),
            Entry(f"{arch}.rope.scaling.factor", float(rope["factor"]), V.FLOAT32),
        ]
    return e


def tokenizer_entries(tokenizer: Any) -> list[Entry]:
    """llama.cpp's tokenizer entries from a Hugging Face fast tokenizer (byte-level BPE), or, without one, the
    "none" vocabulary (llama.cpp then runs on token ids only)."""
    if tokenizer is None:
        return [Entry(K.Tokenizer.MODEL, "none", V.STRING)]
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ExportError(
            f"tokenizer {type(tokenizer).__name__} is not a byte-level BPE tokenizer, the kind lorakit converts; "
            "pass the base as a .gguf file (--model base.gguf), whose tokenizer is copied"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    special = {}
    for tok in spec.get("added_tokens", []):
        vocab[tok["content"]] = tok["id"]
        special[tok["id"]] = bool(tok.get("special"))
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [int(gguf.TokenType.UNUSED)] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = int(
            gguf.TokenType.NORMAL
            if i not in special
            else gguf.TokenType.CONTROL
            if special[i]
            else gguf.TokenType.USER_DEFINED
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    e = [
        Entry(K.Tokenizer.MODEL, "gpt2", V.STRING),
        Entry(K.Tokenizer.LIST, tokens, V.ARRAY, V.STRING),
        Entry(K.Tokenizer.TOKEN_TYPE, types, V.ARRAY, V.INT32),
        Entry(K.Tokenizer.MERGES, merges, V.ARRAY, V.STRING),
    ]
    for key, tok in (
        (K.Tokenizer.BOS_ID, tokenizer.bos_token_id),
        (K.Tokenizer.EOS_ID, tokenizer.eos_token_id),
        (K.Tokenizer.PAD_ID, tokenizer.pad_token_id),
        (K.Tokenizer.UNK_ID, tokenizer.unk_token_id),
    ):
        if tok is not None:
            e.append(Entry(key, int(tok), V.UINT32))
    e.append(Entry(K.Tokenizer.ADD_BOS, bool(getattr(tokenizer, "add_bos_token", False)), V.BOOL))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        e.append(Entry(K.Tokenizer.CHAT_TEMPLATE, template, V.STRING))
    return e


def save_model_gguf(
    model: nn.Module,
    path: str | os.PathLike,
    outtype: str = "f32",
    *,
    base_gguf: str | os.PathLike | None = None,
    tokenizer: Any = None,
    name: str | None = None,
    progress: bool = False,
) -> Path:
    """Write `model` (adapters merged or unloaded) to `path` as a GGUF model llama.cpp runs alone, atomically."""
    gf = model_gguf(model, outtype, base_gguf=base_gguf, tokenizer=tokenizer, name=name)
    return gf.write(Path(path), progress=progress)
