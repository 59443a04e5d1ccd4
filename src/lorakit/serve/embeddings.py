"""OpenAI's embeddings route, POST /v1/embeddings: the vectors of an embedding model's adapter (`lorakit train
--objective embed`, task_type FEATURE_EXTRACTION), served over the same base model as the generation and classifier
adapters; or of the base model itself.

    {"model": "search", "input": ["a text", "another"]}            # a text, texts, token ids, or lists of them
    {"model": "search", "input": "a text", "dimensions": 128, "encoding_format": "base64"}
    -> {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [...]}], "model", "usage"}

Each text is tokenized as training tokenized it (the tokenizer's own special tokens; `lorakit.embeddings`), pooled
as the adapter was trained (its recorded pooling; the base model's default: the last token of a decoder) and
L2-normalized, as sentence-transformers' `encode(normalize_embeddings=True)` gives it. `dimensions` keeps the
first that many and normalizes again (Matryoshka truncation: useful where the model was trained for it).
`encoding_format` "base64" is the float32 little-endian bytes, base64-encoded, as OpenAI's client asks by default.
The embedding runs on the engine thread between decode steps (`Engine.call`), a chunk of rows at a time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from typing import Any

import torch
import torch.nn.functional as F
from fastapi import Request
from fastapi.responses import JSONResponse

from lorakit.embeddings import default_pooling, embed_rows, encode_texts
from lorakit.serve import protocol as P
from lorakit.serve.adapters import AdapterRoutes
from lorakit.serve.classify import MAX_INPUTS, chunks
from lorakit.serve.engine import Engine, EngineStopped
from lorakit.serve.metrics import Latency
from lorakit.serve.routing import route


def parse_embeddings(body: dict[str, Any]) -> tuple[list[str | list[int]], str, int | None]:
    """(inputs, encoding_format, dimensions) of a request; 400 naming the bad field."""
    raw = body.get("input")
    if raw is None:
        raise P.bad(
            "'input' is required: a text, a list of texts, token ids, or a list of token-id lists", "input"
        )
    items = raw if isinstance(raw, list) and raw and not _ids(raw) else [raw]
    if len(items) > MAX_INPUTS:
        raise P.bad(f"{len(items)} inputs in one request, over {MAX_INPUTS}: send fewer", "input")
    for i, x in enumerate(items):
        where = f"input[{i}]" if len(items) > 1 else "input"
        if isinstance(x, str):
            if not x:
                raise P.bad(f"{where} is empty", "input")
        elif not _ids(x):
            raise P.bad(f"{where} must be a non-empty text or a non-empty list of token ids", "input")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise P.bad(f"encoding_format must be float or base64, got {fmt!r}", "encoding_format")
    dims = body.get("dimensions")
    if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or dims < 1):
        raise P.bad(f"dimensions must be an integer >= 1, got {dims!r}", "dimensions")
    return items, fmt, dims


def _ids(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


class EmbeddingRoutes:
    def __init__(self, engine: Engine, adapters: AdapterRoutes, latency: Latency) -> None:
        self.engine, self.adapters, self.bank, self.tok = engine, adapters, engine.bank, engine.tokenizer
        self.latency = latency
        try:  # the base model's own vectors: its folder's pooling, else its last token
            self.base_pooling: str | None = default_pooling(engine.model)
        except ValueError:  # a folder that pools as lorakit does not: the base model embeds nothing
            self.base_pooling = None
        self.pad_id = self.tok.pad_token_id
        self.width = int(engine.model.config.get_text_config().hidden_size)

    async def embeddings(self, request: Request) -> JSONResponse:
        started = time.monotonic()
        body = await P.read_json(request)
        items, fmt, dims = parse_embeddings(body)
        name = P.model_of(body)
        if dims is not None and dims > self.width:
            raise P.bad(f"dimensions {dims} is over the model's {self.width}", "dimensions")
        adapter, hold = await self.adapters.resolve(name)
        model = name or self.adapters.base_name
        with hold:
            ((lease, slot),) = self.adapters.leases(adapter, 1)
        with lease or contextlib.nullcontext():
            pooling = self.base_pooling if slot is None else self.bank.poolings.get(slot)
            if pooling is None:
                raise P.bad(
                    f"the model {model!r} is not an embedding model's adapter (task_type FEATURE_EXTRACTION, as "
                    "lorakit train --objective embed saves one)",
                    "model",
                )
            rows = await asyncio.to_thread(self._encode, items)
            if not self.engine.alive:
                raise P.APIError(503, "the engine is not running", "server_error")
            parts = []
            for chunk in chunks(rows, self.pad_id, self.engine.config.max_prefill_tokens):
                future = self.engine.call(lambda chunk=chunk: self._embed(slot, pooling, chunk))
                try:
                    parts.append(await asyncio.wrap_future(future))
                except EngineStopped:
                    raise P.APIError(503, "the engine has stopped", "server_error") from None
        vectors = torch.cat(parts)
        if dims is not None:
            vectors = F.normalize(vectors[:, :dims], dim=-1)
        data = [
            {"object": "embedding", "index": i, "embedding": _encoded(v, fmt)} for i, v in enumerate(vectors)
        ]
        tokens = sum(len(r) for r in rows)
        self.latency.observe("embeddings", "total", time.monotonic() - started)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse({"object": "list", "data": data, "model": model, "usage": usage})

    def _encode(self, items: list[str | list[int]]) -> list[list[int]]:
        """Each input's token ids (a text's as training tokenized it); 400 naming one over the context length."""
        limit = self.engine.max_model_len
        with self.engine.tokenizer_lock:
            texts = [x for x in items if isinstance(x, str)]
            encoded = iter(encode_texts(self.tok, texts, limit + 1) if texts else [])
        rows = [next(encoded) if isinstance(x, str) else list(x) for x in items]
        vocab = self.engine.vocab_size
        for i, r in enumerate(rows):
            where = f"input[{i}]" if len(rows) > 1 else "input"
            if len(r) > limit:
                raise P.bad(f"{where} is over the context length {limit} (--max-model-len)", "input")
            bad = next((t for t in r if not 0 <= t < vocab), None)
            if bad is not None:
                raise P.bad(f"{where}: token id {bad} is not in the vocabulary (0 to {vocab - 1})", "input")
        return rows

    def _embed(self, slot: str | None, pooling: str, rows: list[list[int]]) -> torch.Tensor:
        """On the engine thread: the rows' embeddings with adapter `slot` (None: the base model) on the backbone."""
        with route(self.engine.model, self.bank, [slot] * len(rows)):
            return embed_rows(self.engine.model, rows, self.pad_id, pooling, batch_size=len(rows)).cpu()


def _encoded(v: torch.Tensor, fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii")
    return v.tolist()
