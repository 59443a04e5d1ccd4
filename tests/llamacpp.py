"""llama.cpp itself, through llama-cpp-python, as the oracle for the GGUF files lorakit writes.

Logits are read for every position with an f32 KV cache (llama.cpp's default f16 cache alone moves SmolLM2's
logits by about 0.05), so that an f32 model computes in f32 throughout; on 2 threads, or on the one thread an xdist
worker has (conftest sets OMP_NUM_THREADS=1 there: llama.cpp's threads spin at each op's barrier, and two of them
beside another worker's on 2 cores wait on each other).
"""

from __future__ import annotations

import os

import numpy as np

F32 = 0  # GGML_TYPE_F32
THREADS = int(os.environ.get("OMP_NUM_THREADS") or 2)


def llama(model: str, lora: str | None = None, n_ctx: int = 256):
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(model),
        lora_path=None if lora is None else str(lora),
        n_ctx=n_ctx,
        logits_all=True,
        verbose=False,
        n_threads=THREADS,
        type_k=F32,
        type_v=F32,
    )


def logits(model: str, ids: list[int], lora: str | None = None) -> np.ndarray:
    """(len(ids), vocab) next-token logits that llama.cpp computes for `ids`."""
    llm = llama(model, lora, n_ctx=max(64, len(ids) + 8))
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def greedy(llm, ids: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
    """llama.cpp's greedy continuation of `ids` (argmax of its own logits), stopping after `eos`. The start of
    `ids` that the previous call evaluated is kept in llama.cpp's KV cache rather than computed again, as
    llama-cpp-python's own generate does (a chat template's prompts share most of their tokens)."""
    keep = 0
    for had, want in zip(llm.input_ids[: llm.n_tokens].tolist(), ids[:-1], strict=False):  # (not the last id)
        if had != want:
            break
        keep += 1
    llm.n_tokens = keep  # eval drops the cache after it
    llm.eval(ids[keep:])
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if nxt == eos:
            break
        out.append(nxt)
        llm.eval([nxt])
    return out
