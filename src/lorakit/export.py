"""Export a merged model: base + adapter folded into plain weights, written as a Hugging Face folder that
`transformers` loads without lorakit."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from lorakit.atomic import atomic_dir
from lorakit.errors import AdapterError
from lorakit.formats import (
    adapter_class_names,
    adapter_num_labels,
    adapter_pooling,
    adapter_problem,
    folder_refusal,
    name_classes,
    read_config_json,
)
from lorakit.inject import unload
from lorakit.io import load_adapter
from lorakit.quant import adapter_base_quantization, dequantize, quantize
from lorakit.task_types import pooling_of
from lorakit.variants.ladder import MERGE_REFUSAL
from lorakit.variants.ladder_io import is_ladder_folder

log = logging.getLogger(__name__)


def merged_model(
    model_spec: str | os.PathLike | None,
    adapter: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    dequantized_base: bool = True,
    device: str | None = None,
):
    """(the base with `adapter` merged in, as a plain transformers model; its tokenizer). A sequence
    classifier's adapter (a reward model's, task_type SEQ_CLS) gives the classifier, its head the adapter's; a
    token classifier's (TOKEN_CLS) the token classifier; an embedding model's (FEATURE_EXTRACTION) the bare model
    (transformers' AutoModel), marked with its pooling (`task_types.pooling_of`).

    An adapter trained on a 4-bit base (QLoRA; recorded in its safetensors metadata) learned ΔW against the
    dequantized weights. With `dequantized_base` the base is quantized the same way and dequantized again before
    merging, so the merged model is exactly the training-time model, W = dequant(quant(W0)) + ΔW, in `dtype`;
    otherwise ΔW goes onto the original full-precision W0. The model is full precision either way:
    re-quantizing W + ΔW would round away much of the update (see docs/qlora.md).
    """
    from lorakit.models import load_model  # transformers, only when a model is loaded

    if is_ladder_folder(adapter):
        raise AdapterError(f"{adapter}: {MERGE_REFUSAL}")
    quant = adapter_base_quantization(adapter)  # a corrupt adapter file fails here, before the model loads
    reason = folder_refusal(adapter, "merge")
    if reason:
        raise AdapterError(reason)
    # a reward model's adapter (SEQ_CLS) goes on the base loaded as the classifier it was trained on; a token
    # classifier's (TOKEN_CLS) on the base loaded as a token classifier
    tags = adapter_num_labels(adapter, task="TOKEN_CLS")
    num_labels = tags or adapter_num_labels(adapter)
    embedder = Path(adapter).is_dir() and read_config_json(adapter).get("task_type") == "FEATURE_EXTRACTION"
    model, tokenizer = load_model(
        model_spec,
        dtype=dtype,
        device=device,
        num_labels=num_labels,
        per_token=tags is not None,
        bare=embedder,
    )
    if embedder:  # its pooling as trained (PEFT's own files do not say: the model's own)
        from lorakit.embeddings import default_pooling
        from lorakit.task_types import mark_embedder

        mark_embedder(model, adapter_pooling(adapter) or default_pooling(model))
    names = adapter_class_names(adapter) if num_labels else None
    if names is not None and len(names) == num_labels:  # a classifier's class names go into config.json
        name_classes(model, names)
    problem = adapter_problem(adapter) if num_labels else None
    if problem is not None:  # config.json says what the outputs are (a regression's, a multi-label's)
        model.config.problem_type = problem
    if quant and dequantized_base:
        if quant.get("method") in ("nf4", "bitsandbytes-nf4"):  # our NF4 is bitsandbytes' (CPU) bit for bit
            quantize(
                model,
                "nf4",
                bool(quant.get("double_quant", True)),
                quant.get("skip", ["lm_head"]),
                block_size=int(quant.get("block_size", 64)),
            )
            dequantize(model)
            log.info("merging into the dequantized %s base the adapter was trained on", quant["method"])
        else:
            log.warning(
                "%s was trained on a %s base, which lorakit cannot reproduce; merging into the full-precision "
                "base instead",
                adapter,
                quant.get("method"),
            )
    load_adapter(model, adapter, allow_pickle=allow_pickle)
    return unload(model, merge=True), tokenizer


def merge_to_folder(
    model_spec: str | os.PathLike | None,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    dequantized_base: bool = True,
    device: str | None = None,
) -> Path:
    """Load the base model, merge `adapter` into it (`merged_model`), and write model + tokenizer to `out`
    atomically: a plain Hugging Face folder; of an embedding model's adapter, also a sentence-transformers model
    (its modules.json, pooling and normalization), which `SentenceTransformer(out)` loads as it was trained."""
    model, tokenizer = merged_model(
        model_spec,
        adapter,
        dtype=dtype,
        allow_pickle=allow_pickle,
        dequantized_base=dequantized_base,
        device=device,
    )

    pooling = pooling_of(model)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if pooling is not None:  # an embedding model: a folder sentence-transformers loads as one
            from lorakit.embeddings import write_st_modules

            chat = bool(getattr(tokenizer, "chat_template", None))
            write_st_modules(tmp, pooling, int(model.config.hidden_size), chat_template=chat)

    out = Path(out)
    atomic_dir(out, write)
    log.info("wrote merged model to %s", out)
    return out
