"""Text embeddings: one vector per text from a model's last hidden states, as sentence-transformers computes them,
for embedding models trained with `lorakit train --objective embed` (PEFT's task_type FEATURE_EXTRACTION) and for
`/v1/embeddings`.

    pooling = default_pooling(model, folder)        # "mean" for MiniLM (its 1_Pooling folder says so), "last" for
                                                     # a decoder such as SmolLM2
    rows = encode_texts(tokenizer, ["a cat", "two dogs"], max_len=256)
    vectors = embed_rows(model, rows, pad_id, pooling)   # (2, hidden) float32, each of length 1

The texts are tokenized as the tokenizer does by itself (BERT's [CLS] ... [SEP]; nothing added for SmolLM2), cut to
`max_len` tokens. Pooling over the last hidden states: the mean over a text's tokens (sentence-transformers'
`pooling_mode_mean_tokens`), its last token (`lasttoken`: decoders read the whole text there) or its first
(`cls`); then L2-normalized, so that a dot product is the cosine similarity.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.classifier_heads import padded
from lorakit.errors import AdapterError
from lorakit.formats import adapter_pooling, read_config_json
from lorakit.task_types import POOLINGS

ST_POOLING = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "last",
    "pooling_mode_cls_token": "cls",
}
"""sentence-transformers' pooling settings (1_Pooling/config.json) that lorakit computes, by its names."""


def default_pooling(model: nn.Module, folder: str | os.PathLike | None = None) -> str:
    """The pooling an embedding model of `model` uses by default: what a sentence-transformers folder's Pooling
    module says (`folder`'s modules.json; by default the folder the model was loaded from), else the mean for an
    encoder (a model type with a masked-LM head, as BERT) and the last token for a decoder (SmolLM2, Llama, Qwen).
    ValueError for a folder whose pooling lorakit does not compute (max, weighted mean)."""
    if folder is None:
        loaded = getattr(getattr(model, "config", None), "_name_or_path", None)
        folder = loaded if loaded and Path(loaded).is_dir() else None
    said = st_pooling(folder) if folder is not None else None
    if said is not None:
        return said
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    kind = getattr(getattr(model, "config", None), "model_type", None)
    return "mean" if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "last"


def st_pooling(folder: str | os.PathLike) -> str | None:
    """The pooling that a sentence-transformers model folder's Pooling module sets (modules.json), or None where the
    folder has none. ValueError naming the file for one lorakit does not compute."""
    folder = Path(folder)
    modules = folder / "modules.json"
    if not modules.is_file():
        return None
    try:
        entries = json.loads(modules.read_text())
        path = next(m.get("path", "") for m in entries if str(m.get("type", "")).endswith(".Pooling"))
    except (ValueError, StopIteration, AttributeError, TypeError):
        return None
    config = folder / path / "config.json"
    try:
        settings = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    chosen = [name for key, name in ST_POOLING.items() if settings.get(key)]
    others = [
        k for k, v in settings.items() if k.startswith("pooling_mode_") and v is True and k not in ST_POOLING
    ]
    if others or len(chosen) != 1:
        raise ValueError(
            f"{config}: pools with {sorted(k for k, v in settings.items() if k.startswith('pooling_mode_') and v)}; "
            f"lorakit pools with one of {', '.join(POOLINGS)} (set embed.pooling)"
        )
    return chosen[0]


def encode_texts(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    """Each text's token ids as the tokenizer adds its own special tokens, cut to `max_len` tokens."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_len)
    return [list(ids) for ids in enc["input_ids"]]


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(batch, hidden) float32 vectors from last hidden states (batch, tokens, hidden) and the attention mask:
    the mean over each row's tokens, its last token (the rightmost with mask 1, padded on either side) or its
    first. Not normalized."""
    hidden = hidden.float()
    if pooling == "mean":
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        positions = torch.arange(mask.shape[1], device=mask.device)
        at = (positions * (mask > 0)).argmax(-1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), at]
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")


def embed_batch(backbone: nn.Module, ids: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """The L2-normalized float32 embeddings of a padded batch through `backbone` (a bare transformers model, its
    DDP wrapper, or a causal LM's `base_model`) with whatever adapter is active; gradients flow."""
    hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return F.normalize(pool(hidden, mask, pooling), dim=-1)


@torch.inference_mode()
def embed_rows(
    model: nn.Module, rows: list[list[int]], pad_id: int | None, pooling: str, *, batch_size: int = 32
) -> torch.Tensor:
    """The L2-normalized embeddings (rows, hidden), float32, of token-id rows, `batch_size` rows at a time, each
    batch right-padded with `pad_id` (0 without one; the attention mask hides it), through the model's backbone
    (`model.base_model`: the bare model itself, or a causal LM's body)."""
    if not rows or any(not r for r in rows):
        raise ValueError("embed_rows needs non-empty token-id rows")
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(rows), batch_size):
        part = rows[start : start + batch_size]
        ids, mask = padded(part, pad_id, device)
        out.append(embed_batch(model.base_model, ids, mask, pooling))
    return torch.cat(out)


def write_st_modules(
    folder: str | os.PathLike, pooling: str, dim: int, *, chat_template: bool = False
) -> None:
    """Make a merged model's folder a sentence-transformers model that embeds as lorakit does: modules.json (the
    transformer, then `pooling`, then L2 normalization) with the Pooling module's config.json. lorakit embeds a
    text as it is; sentence-transformers 6 wraps a text in the tokenizer's chat template where it has one, unless
    the transformer's modality config takes text alone (sentence_bert_config.json, written so with
    `chat_template`)."""
    folder = Path(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "2_Normalize").mkdir(exist_ok=True)
    settings = {"word_embedding_dimension": dim, **{key: name == pooling for key, name in ST_POOLING.items()}}
    settings.update({"pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False})
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(settings, indent=2))
    transformer: dict = {"do_lower_case": False}
    if chat_template:  # the text as it is, not as a chat message (sentence-transformers >= 6 reads these)
        transformer = {
            "transformer_task": "feature-extraction",
            "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
            "module_output_name": "token_embeddings",
        }
    (folder / "sentence_bert_config.json").write_text(json.dumps(transformer, indent=2))


def embedding_pooling(model: nn.Module, path: str | os.PathLike) -> str | None:
    """The pooling of adapter folder `path` when it is an embedding model's (task_type FEATURE_EXTRACTION): what
    its metadata says, else (PEFT's own files) the model's default; None for any other adapter."""
    path = Path(path)
    if not path.is_dir() or read_config_json(path).get("task_type") != "FEATURE_EXTRACTION":
        return None
    try:
        return adapter_pooling(path) or default_pooling(model)
    except ValueError as e:
        raise AdapterError(
            f"{path}: an embedding model's adapter that records no pooling, on a model whose {e}"
        ) from None
