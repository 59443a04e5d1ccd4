"""PEFT task types: which one fits a model (so that `PeftModel.from_pretrained` builds the right wrapper), and
the classification heads that PEFT saves whole with every adapter of that task (`modules_to_save`)."""

from __future__ import annotations

from torch import nn

# transformers' head-class suffixes -> PEFT task types (PeftModel.from_pretrained builds its wrapper by these)
_TASK_SUFFIXES = {
    "ForCausalLM": "CAUSAL_LM",
    "LMHeadModel": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
    "ForSeq2SeqLM": "SEQ_2_SEQ_LM",
}


POOLINGS = ("mean", "last", "cls")
"""How an embedding model reads one vector out of a text's hidden states: the mean over its tokens (BERT-like
encoders, sentence-transformers' default), its last token (decoders: E5-Mistral, Qwen3-Embedding), or its first
token (BERT's [CLS])."""
_POOLING = "_lorakit_pooling"


def mark_embedder(model: nn.Module, pooling: str) -> None:
    """Mark bare `model` (transformers' AutoModel: BertModel, LlamaModel) as an embedding model that pools its last
    hidden states with `pooling`: its adapters are saved as PEFT's FEATURE_EXTRACTION, with the pooling recorded."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    model.__dict__[_POOLING] = pooling


def pooling_of(model: nn.Module) -> str | None:
    """The pooling of an embedding model marked by `mark_embedder`, else None."""
    return model.__dict__.get(_POOLING)


def task_type_for(model: nn.Module) -> str | None:
    """The PEFT task_type that fits `model`, so that PEFT wraps it in the right class when loading the adapter.

    FEATURE_EXTRACTION for a model marked as an embedding model (`mark_embedder`). None (PEFT's default, the plain
    PeftModel) for a bare encoder/decoder or anything else: PEFT's CAUSAL_LM wrapper needs
    `prepare_inputs_for_generation`, which e.g. BertModel lacks."""
    if pooling_of(model) is not None:
        return "FEATURE_EXTRACTION"
    name = type(model).__name__
    # ...ForConditionalGeneration: T5 and BART are seq2seq; multimodal decoders generate like an LM
    if name.endswith("ForConditionalGeneration"):
        encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
        return "SEQ_2_SEQ_LM" if encoder_decoder else "CAUSAL_LM"
    for suffix, task in _TASK_SUFFIXES.items():
        if name.endswith(suffix):
            return task
    return None


# the heads PEFT adds to modules_to_save for each classification task type (and expects in the file)
_HEAD_NAMES = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}
CLASSIFICATION = frozenset(_HEAD_NAMES)


def task_heads(model: nn.Module, task_type: str | None) -> dict[str, nn.Module]:
    """The task's head modules that `model` has, by name (top-level names, as PEFT matches them)."""
    return {
        n: m
        for n in _HEAD_NAMES.get(task_type or "", ())
        if isinstance(m := getattr(model, n, None), nn.Module)
    }
